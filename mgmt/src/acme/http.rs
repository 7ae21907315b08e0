//! The HTTPS client the ACME library talks through: rustls on the process's one crypto provider,
//! trusting `directory_ca` (a private CA such as pebble's) or the system's roots, and keeping the
//! last `Retry-After` an error answer carried so the back-off can respect it.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};
use parking_lot::Mutex;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

type Inner = HyperClient<hyper_rustls::HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>;

/// An [`HttpClient`] for instant-acme.
pub struct Client {
    inner: Inner,
    retry_after: Arc<Mutex<Option<SystemTime>>>,
}

/// Where [`Client`] leaves the last `Retry-After` of an error answer.
pub type RetryAfter = Arc<Mutex<Option<SystemTime>>>;

impl Client {
    pub fn new(directory_ca: Option<&Path>) -> Result<(Client, RetryAfter)> {
        let provider = crate::tls::provider();
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match directory_ca {
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                    .and_then(|i| i.collect())
                    .with_context(|| format!("directory_ca {}", path.display()))?;
                if certs.is_empty() {
                    bail!("directory_ca {}: no CERTIFICATE block", path.display());
                }
                for c in certs {
                    roots
                        .add(c)
                        .with_context(|| format!("directory_ca {}", path.display()))?;
                }
                let tls = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .context("TLS for the ACME directory")?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                builder.with_tls_config(tls)
            }
            None => builder
                .with_provider_and_native_roots(provider)
                .context("the system's trusted roots for the ACME directory")?,
        };
        let connector = builder.https_only().enable_http1().enable_http2().build();
        let mut hyper = HyperClient::builder(TokioExecutor::new());
        hyper.pool_idle_timeout(Duration::from_secs(30));
        let retry_after: RetryAfter = Arc::new(Mutex::new(None));
        Ok((
            Client {
                inner: hyper.build(connector),
                retry_after: retry_after.clone(),
            },
            retry_after,
        ))
    }
}

impl HttpClient for Client {
    fn request(
        &self,
        req: hyper::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let fut = HttpClient::request(&self.inner, req);
        let slot = self.retry_after.clone();
        Box::pin(async move {
            let rsp = fut.await?;
            let status = rsp.parts.status;
            if status.is_client_error() || status.is_server_error() {
                if let Some(at) = retry_after(&rsp.parts.headers) {
                    *slot.lock() = Some(at);
                }
            }
            Ok(rsp)
        })
    }
}

/// `Retry-After` in seconds (the form ACME CAs send); an HTTP-date is not parsed.
fn retry_after(headers: &hyper::HeaderMap) -> Option<SystemTime> {
    let v = headers
        .get(hyper::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    let now = SystemTime::now();
    // RFC 9110 §10.2.3: delay-seconds or an HTTP-date; either is capped at a week.
    let wait = match v.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(v)
            .ok()?
            .duration_since(now)
            .unwrap_or_default(),
    };
    Some(now + wait.min(Duration::from_secs(7 * 86400)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(v: &str) -> anyhow::Result<Option<Duration>> {
        let mut h = hyper::HeaderMap::new();
        h.insert(hyper::header::RETRY_AFTER, v.parse()?);
        Ok(retry_after(&h).map(|t| t.duration_since(SystemTime::now()).unwrap_or_default()))
    }

    #[test]
    fn retry_after_takes_seconds_and_http_dates_capped_at_a_week() -> anyhow::Result<()> {
        let secs = at("120")?.context("seconds")?;
        assert!(secs > Duration::from_secs(110) && secs <= Duration::from_secs(120));
        let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3600));
        let d = at(&date)?.context("a date")?;
        assert!(
            d > Duration::from_secs(3500) && d <= Duration::from_secs(3600),
            "{d:?}"
        );
        let far = at("999999999")?.context("far")?;
        assert!(far <= Duration::from_secs(7 * 86400));
        assert_eq!(at("Sun, 06 Nov 1994 08:49:37 GMT")?, Some(Duration::ZERO));
        assert_eq!(at("soon")?, None);
        Ok(())
    }
}
