//! A Prometheus instant-query client (`/api/v1/query`): one request, one
//! parsed vector, or an error that says why. Nothing here decides what a
//! value means; see [`crate::evaluate`].

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use serde::Deserialize;

/// One series of an instant vector.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// The series' labels.
    pub labels: BTreeMap<String, String>,
    /// Unix time of the value.
    pub time: f64,
    /// The value as Prometheus wrote it (may be `NaN`, `+Inf`).
    pub value: String,
}

/// Why a query gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The URL or settings are wrong.
    #[error("bad Prometheus settings: {0}")]
    Config(String),
    /// No connection, or the connection broke.
    #[error("Prometheus unreachable: {0}")]
    Unreachable(String),
    /// No answer in time.
    #[error("Prometheus did not answer within {0:?}")]
    Timeout(Duration),
    /// Prometheus answered with an error.
    #[error("Prometheus error ({kind}): {message}")]
    Prometheus {
        /// `errorType`, or the HTTP status when the body is not Prometheus JSON.
        kind: String,
        /// `error`.
        message: String,
    },
    /// The answer is not an instant vector.
    #[error("unexpected answer: {0}")]
    Malformed(String),
}

#[derive(Deserialize)]
struct Envelope {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: serde_json::Value,
}

#[derive(Deserialize)]
struct RawSeries {
    #[serde(default)]
    metric: BTreeMap<String, String>,
    value: (f64, String),
}

/// Parses an instant-query answer. Only vectors are accepted: a scalar has no
/// labels, so it cannot name a node.
pub fn parse_answer(status: u16, body: &[u8]) -> Result<Vec<Series>, QueryError> {
    let env: Envelope = serde_json::from_slice(body).map_err(|e| {
        if (200..300).contains(&status) {
            QueryError::Malformed(format!("not Prometheus JSON: {e}"))
        } else {
            QueryError::Prometheus {
                kind: format!("HTTP {status}"),
                message: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
            }
        }
    })?;
    if env.status != "success" {
        return Err(QueryError::Prometheus {
            kind: env.error_type.unwrap_or_else(|| format!("HTTP {status}")),
            message: env.error.unwrap_or_default(),
        });
    }
    let data = env
        .data
        .ok_or_else(|| QueryError::Malformed("no data".into()))?;
    if data.result_type != "vector" {
        return Err(QueryError::Malformed(format!(
            "result type {} (the query must return an instant vector with one series per node)",
            data.result_type
        )));
    }
    let raw: Vec<RawSeries> = serde_json::from_value(data.result)
        .map_err(|e| QueryError::Malformed(format!("vector: {e}")))?;
    Ok(raw
        .into_iter()
        .map(|r| Series {
            labels: r.metric,
            time: r.value.0,
            value: r.value.1,
        })
        .collect())
}

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// A client for one Prometheus server.
#[derive(Clone)]
pub struct Prometheus {
    base: String,
    token: Option<String>,
    timeout: Duration,
    client: Client<Https, Full<Bytes>>,
}

impl std::fmt::Debug for Prometheus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prometheus")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// Answers bigger than this are refused (a vector of 10,000 series is ~2 MiB).
const MAX_ANSWER: usize = 16 << 20;

impl Prometheus {
    /// A client for `url` (http or https), with an optional bearer token file
    /// and CA bundle for https.
    pub fn new(
        url: &str,
        token_file: Option<&Path>,
        ca_file: Option<&Path>,
        timeout: Duration,
    ) -> Result<Prometheus, QueryError> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| QueryError::Config(format!("--prometheus-url {url:?}: {e}")))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(QueryError::Config(format!(
                "--prometheus-url {url:?}: use http:// or https://"
            )));
        }
        let token = token_file
            .map(|p| {
                std::fs::read_to_string(p)
                    .map(|t| t.trim().to_string())
                    .map_err(|e| {
                        QueryError::Config(format!("--prometheus-token-file {}: {e}", p.display()))
                    })
            })
            .transpose()?;
        let mut roots = rustls::RootCertStore::empty();
        if let Some(ca) = ca_file {
            use rustls::pki_types::{pem::PemObject, CertificateDer};
            let certs = CertificateDer::pem_file_iter(ca).map_err(|e| {
                QueryError::Config(format!("--prometheus-ca-file {}: {e}", ca.display()))
            })?;
            for c in certs {
                let c = c.map_err(|e| {
                    QueryError::Config(format!("--prometheus-ca-file {}: {e}", ca.display()))
                })?;
                roots.add(c).map_err(|e| {
                    QueryError::Config(format!("--prometheus-ca-file {}: {e}", ca.display()))
                })?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| QueryError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
        Ok(Prometheus {
            base: url.trim_end_matches('/').to_string(),
            token,
            timeout,
            client,
        })
    }

    /// The server's host, when it is an IP address (to protect it on nodes).
    pub fn address(&self) -> Option<std::net::IpAddr> {
        let uri: hyper::Uri = self.base.parse().ok()?;
        uri.host()?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok()
    }

    /// Runs an instant query now.
    pub async fn query(&self, promql: &str) -> Result<Vec<Series>, QueryError> {
        let form: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", promql)
            .append_pair("timeout", &format!("{}s", self.timeout.as_secs().max(1)))
            .finish();
        let mut req = hyper::Request::post(format!("{}/api/v1/query", self.base))
            .header("content-type", "application/x-www-form-urlencoded");
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| QueryError::Config(e.to_string()))?;
        let fut = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| QueryError::Unreachable(error_chain(&e)))?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| QueryError::Unreachable(e.to_string()))?
                .to_bytes();
            parse_answer(status, &body)
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| QueryError::Timeout(self.timeout))?
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_and_errors_as_prometheus_writes_them() {
        let ok = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"node":"a"},"value":[1700000000.5,"1.5e7"]},{"metric":{},"value":[1700000000.5,"NaN"]}]}}"#;
        let s = parse_answer(200, ok).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].labels["node"].as_str(), s[0].value.as_str()),
            ("a", "1.5e7")
        );
        let empty = br#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert!(parse_answer(200, empty).unwrap().is_empty());
        let err = br#"{"status":"error","errorType":"bad_data","error":"parse error at char 4"}"#;
        assert_eq!(
            parse_answer(400, err).unwrap_err().to_string(),
            "Prometheus error (bad_data): parse error at char 4"
        );
        let scalar = br#"{"status":"success","data":{"resultType":"scalar","result":[1,"2"]}}"#;
        assert!(parse_answer(200, scalar)
            .unwrap_err()
            .to_string()
            .contains("result type scalar"));
        assert!(parse_answer(502, b"Bad Gateway")
            .unwrap_err()
            .to_string()
            .contains("HTTP 502"));
    }
}
