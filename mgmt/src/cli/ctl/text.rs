//! `tlsgate ctl`'s text form of each answer (without `--json`), read from the [`wire`] types.

use crate::api::wire;

/// The text `ctl` prints for an answer.
pub(super) trait Text {
    fn text(&self) -> String;
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".to_owned(), T::to_string)
}

fn list(v: &[String]) -> String {
    v.join(",")
}

/// One line per item, or `(none)`.
fn lines<T: Text>(items: &[T]) -> String {
    if items.is_empty() {
        return "(none)".to_owned();
    }
    items.iter().map(Text::text).collect::<Vec<_>>().join("\n")
}

fn as_str<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "-".to_owned(),
    }
}

macro_rules! list_text {
    ($($t:ty),*) => {$(
        impl Text for $t {
            fn text(&self) -> String {
                lines(&self.items)
            }
        }
    )*};
}
list_text!(
    wire::CertList,
    wire::ListenerList,
    wire::CrlList,
    wire::PoolList,
    wire::AcmeList
);

impl Text for wire::PoolView {
    fn text(&self) -> String {
        let mut out = format!(
            "pool {} balance={} alpn={}",
            self.name,
            as_str(&self.balance),
            list(&self.alpn)
        );
        for sv in &self.servers {
            out.push_str(&format!(
                "\n  {:<22} state={:<5} health={:<7} active={} total={} weight={} connect_errors={}",
                sv.address,
                as_str(&sv.state),
                as_str(&sv.health),
                sv.active,
                sv.total,
                sv.weight,
                sv.connect_errors
            ));
        }
        out
    }
}

impl Text for wire::KeyList {
    fn text(&self) -> String {
        if self.items.is_empty() {
            return "(none)".to_owned();
        }
        self.items
            .iter()
            .map(|k| {
                format!(
                    "{:<20} {:<9} {:<9} {} used_by={}",
                    k.label,
                    k.kind,
                    k.origin,
                    k.spki_sha256,
                    list(&k.used_by)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A single key (generate, import).
impl Text for wire::KeyView {
    fn text(&self) -> String {
        format!(
            "key {} ({}, {}) uri={} spki_sha256={}",
            self.label, self.kind, self.origin, self.uri, self.spki_sha256
        )
    }
}

impl Text for wire::AcmeStatus {
    fn text(&self) -> String {
        let mut out = format!(
            "{:<12} {:<9} not_after={} next_renewal={} orders={} failures={} key={} issuer={}",
            self.name,
            self.state,
            opt(&self.not_after),
            opt(&self.next_renewal),
            self.orders_placed,
            self.failures,
            opt(&self.key),
            opt(&self.issuer)
        );
        if let Some(o) = &self.orderer {
            out.push_str(&format!(" orderer={o}"));
        }
        if let Some(e) = &self.last_error {
            out.push_str(&format!("\n  last_error: {} {}", e.kind, e.detail));
            for sp in &e.subproblems {
                out.push_str(&format!(
                    "\n    {}: {} {}",
                    opt(&sp.identifier),
                    opt(&sp.kind),
                    opt(&sp.detail)
                ));
            }
        }
        out
    }
}

impl Text for wire::CertListItem {
    fn text(&self) -> String {
        match self {
            wire::CertListItem::Problem(p) => format!(
                "{:<20} PROBLEM {}: {}",
                p.id, p.problem.code, p.problem.message
            ),
            wire::CertListItem::Ok(c) => format!(
                "{:<20} not_after={} subject={} sans={} bound_to={}",
                c.id,
                c.not_after,
                c.subject,
                list(&c.sans),
                list(&c.bound_to)
            ),
        }
    }
}

impl Text for wire::ListenerView {
    fn text(&self) -> String {
        let certs = match &self.binding {
            Some(b) => b
                .iter()
                .map(|c| format!("{}{}", c.cert, if c.default { "(default)" } else { "" }))
                .collect::<Vec<_>>()
                .join(","),
            None => format!("{} from the configuration file", self.config_certificates),
        };
        let client_ca = match &self.client_ca {
            Some(c) => format!(" client_ca=uploaded({})", c.certificates.len()),
            None => String::new(),
        };
        format!(
            "{:<16} {:<22} source={} certs={} crls={}{client_ca}",
            self.name,
            self.bind,
            as_str(&self.source),
            certs,
            self.crls.len()
        )
    }
}

impl Text for wire::CrlView {
    fn text(&self) -> String {
        format!(
            "{} issuer={} next_update={} revoked={}",
            self.id,
            self.issuer,
            opt(&self.next_update),
            self.revoked
        )
    }
}

impl Text for wire::FleetConfigView {
    fn text(&self) -> String {
        self.toml.trim_end().to_owned()
    }
}

impl Text for wire::ClientCaView {
    fn text(&self) -> String {
        let mut out = format!(
            "client CA bundle of listener {} ({} certificates)",
            self.listener,
            self.certificates.len()
        );
        for c in &self.certificates {
            out.push_str(&format!(
                "\n  {} not_after={} sha256={}",
                c.subject, c.not_after, c.sha256
            ));
        }
        out
    }
}

/// A single certificate (show, upload).
impl Text for wire::CertView {
    fn text(&self) -> String {
        format!(
            "certificate {} subject={} not_after={} sha256={} bound_to={}",
            self.id,
            self.subject,
            self.not_after,
            self.fingerprint_sha256,
            list(&self.bound_to)
        )
    }
}

impl Text for wire::ServerState {
    fn text(&self) -> String {
        format!(
            "{} {} state={}",
            self.pool,
            self.server,
            as_str(&self.state)
        )
    }
}

impl Text for wire::Renewing {
    fn text(&self) -> String {
        format!("202 Accepted: {{\"renewing\":{}}}", self.renewing)
    }
}

impl Text for wire::Reloaded {
    fn text(&self) -> String {
        format!("200 OK: {{\"reloaded\":{}}}", self.reloaded)
    }
}

impl Text for wire::FleetStatus {
    fn text(&self) -> String {
        let mut out = format!(
            "state revision {}; this appliance {}\n{:<16} {:>8} {:>5}  error",
            self.state_revision, self.this, "member", "applied", "lag"
        );
        for m in &self.members {
            out.push_str(&format!(
                "\n{:<16} {:>8} {:>5}  {}",
                m.name,
                m.applied_revision,
                m.lag,
                opt(&m.error)
            ));
            if !m.missing_keys.is_empty() {
                out.push_str(&format!(
                    "\n{:<16} key missing on its HSM (not bound there): {}",
                    "",
                    m.missing_keys.join(", ")
                ));
            }
        }
        out
    }
}
