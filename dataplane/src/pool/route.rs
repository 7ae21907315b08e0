//! Which pool a ClientHello goes to: by an ALPN protocol the client offers, by SNI (exact
//! names, then `*.` wildcards, then routes without a name), else the listener's default pool.
//! Decided once the `Acceptor` has the ClientHello, before the certificate is chosen; the
//! protocol the server answers with follows from the route.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use super::Pool;

/// The server names a route matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SniMatch {
    /// Every ClientHello, with or without SNI.
    Any,
    /// One name (lower case, no trailing dot).
    Exact(String),
    /// `*.example.com`: names one label below `example.com` (held as `.example.com`).
    Wildcard(String),
}

impl SniMatch {
    /// Parses `name`, `*.suffix` or an absent name.
    pub fn parse(sni: Option<&str>) -> Self {
        match sni {
            None => SniMatch::Any,
            Some(s) => {
                let s = s.trim_end_matches('.').to_ascii_lowercase();
                match s.strip_prefix('*') {
                    Some(rest) => SniMatch::Wildcard(rest.to_string()),
                    None => SniMatch::Exact(s),
                }
            }
        }
    }

    fn matches(&self, sni: Option<&str>) -> bool {
        match (self, sni) {
            (SniMatch::Any, _) => true,
            (_, None) => false,
            (SniMatch::Exact(n), Some(s)) => n.eq_ignore_ascii_case(s.trim_end_matches('.')),
            (SniMatch::Wildcard(suffix), Some(s)) => {
                let s = s.trim_end_matches('.');
                s.len() > suffix.len()
                    && s.is_char_boundary(s.len() - suffix.len())
                    && s[s.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                    && !s[..s.len() - suffix.len()].contains('.')
            }
        }
    }

    fn rank(&self) -> u8 {
        match self {
            SniMatch::Exact(_) => 0,
            SniMatch::Wildcard(_) => 1,
            SniMatch::Any => 2,
        }
    }
}

/// One route of a listener.
#[derive(Debug)]
pub struct Route {
    /// The names it takes.
    pub sni: SniMatch,
    /// Taken only when the client offers this protocol, which is then the one negotiated.
    pub alpn: Option<Vec<u8>>,
    /// Where it goes.
    pub pool: Arc<Pool>,
    /// ClientHellos routed here (`tlsgate_route_hits_total`).
    pub hits: AtomicU64,
}

impl Route {
    /// A route to `pool`.
    pub fn new(sni: SniMatch, alpn: Option<Vec<u8>>, pool: Arc<Pool>) -> Self {
        Self {
            sni,
            alpn,
            pool,
            hits: AtomicU64::new(0),
        }
    }

    /// A label for metrics and logs: `sni|alpn`, `*` for any.
    pub fn label(&self) -> String {
        let sni = match &self.sni {
            SniMatch::Any => "*".to_string(),
            SniMatch::Exact(n) => n.clone(),
            SniMatch::Wildcard(s) => format!("*{s}"),
        };
        let alpn = self
            .alpn
            .as_ref()
            .map_or("*".to_string(), |a| String::from_utf8_lossy(a).into_owned());
        format!("{sni}|{alpn}")
    }
}

/// A listener's routes and default pool.
#[derive(Debug)]
pub struct RouteTable {
    /// In the order they are tried (sorted by [`RouteTable::new`]).
    pub routes: Vec<Route>,
    /// Where a ClientHello no route takes goes; `None`: `unrecognized_name`.
    pub default: Option<Arc<Pool>>,
    /// ClientHellos that went to the default pool.
    pub default_hits: AtomicU64,
}

/// What [`RouteTable::select`] decided.
#[derive(Debug, Clone)]
pub enum Selected {
    /// Go to `pool`, negotiating `alpn` (`None`: no ALPN in the ServerHello).
    Pool {
        /// The pool.
        pool: Arc<Pool>,
        /// The route's index in [`RouteTable::routes`]; `None` for the default pool.
        route: Option<usize>,
        /// The protocol to answer with.
        alpn: Option<Vec<u8>>,
    },
    /// No route and no default: `unrecognized_name`.
    UnknownName,
    /// The client offered protocols and the pool speaks none of them: `no_application_protocol`.
    NoProtocol,
}

impl RouteTable {
    /// Routes that need an ALPN protocol are tried first (so `acme-tls/1` reaches its pool
    /// whatever the name); within each group exact names, then wildcards, then name-less
    /// routes; otherwise in configuration order.
    pub fn new(mut routes: Vec<Route>, default: Option<Arc<Pool>>) -> Self {
        routes.sort_by_key(|r| (r.alpn.is_none(), r.sni.rank()));
        Self {
            routes,
            default,
            default_hits: AtomicU64::new(0),
        }
    }

    /// Every pool the table names, each once.
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        let mut out: Vec<Arc<Pool>> = Vec::new();
        for p in self
            .routes
            .iter()
            .map(|r| &r.pool)
            .chain(self.default.iter())
        {
            if !out.iter().any(|o| Arc::ptr_eq(o, p)) {
                out.push(p.clone());
            }
        }
        out
    }

    /// Routes a ClientHello by its SNI and the protocols it offers (`None`: no ALPN extension).
    pub fn select(&self, sni: Option<&str>, offered: Option<&[&[u8]]>) -> Selected {
        let offers = |p: &[u8]| offered.is_some_and(|o| o.contains(&p));
        let hit = self
            .routes
            .iter()
            .enumerate()
            .find(|(_, r)| r.sni.matches(sni) && r.alpn.as_deref().is_none_or(offers));
        let (pool, route, fixed) = match hit {
            Some((i, r)) => {
                r.hits.fetch_add(1, Relaxed);
                (r.pool.clone(), Some(i), r.alpn.clone())
            }
            None => match &self.default {
                Some(p) => {
                    self.default_hits.fetch_add(1, Relaxed);
                    (p.clone(), None, None)
                }
                None => return Selected::UnknownName,
            },
        };
        let alpn = match (fixed, offered) {
            (Some(p), _) => Some(p),
            (None, None) => None,
            (None, Some(_)) if pool.alpn.is_empty() => None,
            // The client's preference order, among what the pool speaks.
            (None, Some(o)) => match o.iter().find(|p| pool.alpn.iter().any(|a| a == *p)) {
                Some(p) => Some(p.to_vec()),
                None if pool.alpn_optional => None,
                None => return Selected::NoProtocol,
            },
        };
        Selected::Pool { pool, route, alpn }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn pool(name: &str, alpn: &[&str]) -> Arc<Pool> {
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("literal");
        let mut p = Pool::single(name, addr, std::time::Duration::from_secs(1));
        p.alpn = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
        Arc::new(p)
    }

    fn name_of(s: &Selected) -> (&str, Option<&[u8]>) {
        match s {
            Selected::Pool { pool, alpn, .. } => (pool.name.as_str(), alpn.as_deref()),
            Selected::UnknownName => ("<unknown>", None),
            Selected::NoProtocol => ("<no protocol>", None),
        }
    }

    #[test]
    fn sni_exact_wildcard_alpn_and_default() {
        let web = pool("web", &["h2", "http/1.1"]);
        let api = pool("api", &["http/1.1"]);
        let acme = pool("acme", &[]);
        let t = RouteTable::new(
            vec![
                Route::new(SniMatch::parse(Some("*.example.com")), None, web.clone()),
                Route::new(SniMatch::parse(Some("api.example.com")), None, api.clone()),
                Route::new(SniMatch::Any, Some(b"acme-tls/1".to_vec()), acme),
            ],
            Some(web.clone()),
        );
        let h2: &[&[u8]] = &[b"h2", b"http/1.1"];
        let h11_first: &[&[u8]] = &[b"http/1.1", b"h2"];
        assert_eq!(
            name_of(&t.select(Some("api.example.com"), Some(h2))),
            ("api", Some(&b"http/1.1"[..]))
        );
        assert_eq!(
            name_of(&t.select(Some("WWW.Example.com."), Some(h2))),
            ("web", Some(&b"h2"[..]))
        );
        assert_eq!(
            name_of(&t.select(Some("www.example.com"), Some(h11_first))),
            ("web", Some(&b"http/1.1"[..])),
            "the client's order wins"
        );
        assert_eq!(
            name_of(&t.select(Some("a.b.example.com"), None)),
            ("web", None),
            "wildcards take one label"
        );
        assert_eq!(name_of(&t.select(Some("example.com"), None)).0, "web");
        let acme_offer: &[&[u8]] = &[b"acme-tls/1"];
        assert_eq!(
            name_of(&t.select(Some("x.example.com"), Some(acme_offer))),
            ("acme", Some(&b"acme-tls/1"[..]))
        );
        let foo: &[&[u8]] = &[b"foo"];
        assert!(matches!(
            t.select(Some("api.example.com"), Some(foo)),
            Selected::NoProtocol
        ));
        let mut lenient = Pool::single(
            "lenient",
            "127.0.0.1:2".parse().expect("literal"),
            std::time::Duration::from_secs(1),
        );
        lenient.alpn = vec![b"h2".to_vec()];
        lenient.alpn_optional = true;
        let t2 = RouteTable::new(Vec::new(), Some(Arc::new(lenient)));
        assert_eq!(
            name_of(&t2.select(None, Some(foo))),
            ("lenient", None),
            "served without ALPN"
        );
        let strict = RouteTable::new(
            vec![Route::new(
                SniMatch::parse(Some("api.example.com")),
                None,
                api,
            )],
            None,
        );
        assert!(matches!(
            strict.select(Some("other.test"), None),
            Selected::UnknownName
        ));
        assert!(matches!(strict.select(None, None), Selected::UnknownName));
        assert_eq!(strict.routes[0].hits.load(Relaxed), 0);
        assert_eq!(t.pools().len(), 3);
    }
}
