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
    /// The answer is too big to use: too many series, or too many bytes.
    #[error("answer too large: {0}")]
    TooLarge(String),
}

/// At most this many series in one answer. A quarantine trigger needs one
/// series per node; more means the query is not aggregated.
pub const MAX_SERIES: usize = 20_000;

/// Answers bigger than this are not read (20,000 series with a few labels
/// each are ~3 MiB).
pub const MAX_ANSWER: usize = 8 << 20;

const AGGREGATE: &str =
    "aggregate it to one series per node, e.g. sum by (instance) (rate(...[2m]))";

/// The answer, read straight from the bytes into what is needed: no JSON
/// tree is built, and series beyond [`MAX_SERIES`] are skipped, not kept.
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

/// `data`: the result type, and the series when it is (or may be) a vector.
#[derive(Default)]
struct Data {
    result_type: Option<String>,
    result: SeriesList,
}

#[derive(Default)]
struct SeriesList {
    series: Vec<Series>,
    /// Series beyond [`MAX_SERIES`] (skipped).
    more: bool,
    /// Elements that are not series with a value (another result type).
    odd: bool,
}

/// One element of `result`, tolerant: anything but a series with a value is
/// [`Element::Other`] (a scalar's `[time, "value"]`, a matrix's `values`), so
/// the result type decides the error whatever order the keys come in.
enum Element {
    /// A series with a value.
    Series(Series),
    /// Anything else.
    Other,
}

#[derive(Deserialize)]
struct RawSeries {
    #[serde(default)]
    metric: BTreeMap<String, String>,
    #[serde(default)]
    value: Option<(f64, String)>,
}

mod de {
    use std::fmt;

    use serde::de::{
        value::MapAccessDeserializer, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess,
        Visitor,
    };

    use super::{Data, Element, RawSeries, Series, SeriesList, MAX_SERIES};

    impl<'de> Deserialize<'de> for Data {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Data;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("an object with resultType and result")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Data, A::Error> {
                    let mut data = Data::default();
                    while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                        match key.as_ref() {
                            "resultType" => data.result_type = Some(map.next_value()?),
                            // Prometheus writes resultType first: a result of
                            // another type is skipped unread.
                            "result"
                                if data.result_type.as_deref().is_none_or(|t| t == "vector") =>
                            {
                                data.result = map.next_value()?
                            }
                            _ => {
                                map.next_value::<IgnoredAny>()?;
                            }
                        }
                    }
                    Ok(data)
                }
            }
            d.deserialize_map(V)
        }
    }

    impl<'de> Deserialize<'de> for SeriesList {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = SeriesList;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a list of series")
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SeriesList, A::Error> {
                    let mut out = SeriesList::default();
                    while out.series.len() < MAX_SERIES {
                        match seq.next_element::<Element>()? {
                            Some(Element::Series(s)) => out.series.push(s),
                            Some(Element::Other) => out.odd = true,
                            None => return Ok(out),
                        }
                    }
                    // Past the cap: read on (the JSON must stay valid) without keeping.
                    while seq.next_element::<IgnoredAny>()?.is_some() {
                        out.more = true;
                    }
                    Ok(out)
                }
                fn visit_unit<E: serde::de::Error>(self) -> Result<SeriesList, E> {
                    Ok(SeriesList {
                        odd: true,
                        ..SeriesList::default()
                    })
                }
            }
            d.deserialize_any(V)
        }
    }

    impl<'de> Deserialize<'de> for Element {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Element;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a series")
                }
                fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Element, A::Error> {
                    let raw = RawSeries::deserialize(MapAccessDeserializer::new(map))?;
                    Ok(match raw.value {
                        Some((time, value)) => Element::Series(Series {
                            labels: raw.metric,
                            time,
                            value,
                        }),
                        None => Element::Other,
                    })
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Element, A::Error> {
                    while seq.next_element::<IgnoredAny>()?.is_some() {}
                    Ok(Element::Other)
                }
                fn visit_bool<E>(self, _: bool) -> Result<Element, E> {
                    Ok(Element::Other)
                }
                fn visit_i64<E>(self, _: i64) -> Result<Element, E> {
                    Ok(Element::Other)
                }
                fn visit_u64<E>(self, _: u64) -> Result<Element, E> {
                    Ok(Element::Other)
                }
                fn visit_f64<E>(self, _: f64) -> Result<Element, E> {
                    Ok(Element::Other)
                }
                fn visit_str<E>(self, _: &str) -> Result<Element, E> {
                    Ok(Element::Other)
                }
                fn visit_unit<E>(self) -> Result<Element, E> {
                    Ok(Element::Other)
                }
            }
            d.deserialize_any(V)
        }
    }
}

/// Parses an instant-query answer. Only vectors are accepted: a scalar has no
/// labels, so it cannot name a node. At most [`MAX_SERIES`] series.
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
    let result_type = data.result_type.unwrap_or_default();
    if result_type != "vector" {
        return Err(QueryError::Malformed(format!(
            "result type {result_type} (the query must return an instant vector with one series per node)",
        )));
    }
    if data.result.odd {
        return Err(QueryError::Malformed(
            "vector: an element is not a series with a value".into(),
        ));
    }
    if data.result.more {
        return Err(QueryError::TooLarge(format!(
            "the query returns more than {MAX_SERIES} series; {AGGREGATE}"
        )));
    }
    Ok(data.result.series)
}

/// Reads a response body, at most `limit` bytes: a bigger answer is refused
/// before it is in memory.
async fn read_capped<B>(
    body: B,
    content_length: Option<u64>,
    limit: usize,
) -> Result<Bytes, QueryError>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let too_large = || {
        QueryError::TooLarge(format!(
            "Prometheus answered more than {} MiB; the query returns too many series: {AGGREGATE}",
            limit >> 20
        ))
    };
    if content_length.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(QueryError::Unreachable(e.to_string())),
    }
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
            let length = resp
                .headers()
                .get(hyper::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse().ok());
            let body = read_capped(resp.into_body(), length, MAX_ANSWER).await?;
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
        // Key order does not matter; extra fields are skipped.
        let reordered = br#"{"data":{"result":[{"value":[1.0,"3"],"metric":{"instance":"b:9100"}}],"resultType":"vector"},"warnings":["x"],"status":"success"}"#;
        let s = parse_answer(200, reordered).unwrap();
        assert_eq!(
            (
                s[0].labels["instance"].as_str(),
                s[0].time,
                s[0].value.as_str()
            ),
            ("b:9100", 1.0, "3")
        );
        let scalar_first =
            br#"{"status":"success","data":{"result":[1,"2"],"resultType":"scalar"}}"#;
        assert!(parse_answer(200, scalar_first)
            .unwrap_err()
            .to_string()
            .contains("result type scalar"));
        let matrix = br#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},"values":[[1,"2"]]}]}}"#;
        assert!(parse_answer(200, matrix)
            .unwrap_err()
            .to_string()
            .contains("result type matrix"));
        let no_value =
            br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{}}]}}"#;
        assert_eq!(
            parse_answer(200, no_value).unwrap_err().to_string(),
            "unexpected answer: vector: an element is not a series with a value"
        );
        assert!(parse_answer(200, b"{")
            .unwrap_err()
            .to_string()
            .starts_with("unexpected answer: not Prometheus JSON"));
    }

    #[test]
    fn only_a_series_with_a_value_is_a_series() {
        let element = |json: &str| serde_json::from_str::<Element>(json).expect("element");
        assert!(matches!(
            element(r#"{"metric":{"node":"a"},"value":[1,"2"]}"#),
            Element::Series(s) if s.labels["node"] == "a" && s.value == "2"
        ));
        for other in [
            r#"{"metric":{}}"#,
            r#"{"metric":{},"values":[[1,"2"]]}"#,
            r#"[1,"2"]"#,
            "1",
            "-1",
            "1.5",
            r#""x""#,
            "true",
            "null",
        ] {
            assert!(matches!(element(other), Element::Other), "{other}");
        }
        // One odd element refuses the whole vector, wherever it is.
        let mixed = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"2"]},7]}}"#;
        assert!(matches!(
            parse_answer(200, mixed),
            Err(QueryError::Malformed(m)) if m == "vector: an element is not a series with a value"
        ));
    }

    fn vector(n: usize) -> Vec<u8> {
        let series: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    r#"{{"metric":{{"instance":"10.0.{}.{}:9100"}},"value":[1700000000,"{i}"]}}"#,
                    i / 256,
                    i % 256
                )
            })
            .collect();
        format!(
            r#"{{"status":"success","data":{{"resultType":"vector","result":[{}]}}}}"#,
            series.join(",")
        )
        .into_bytes()
    }

    #[test]
    fn too_many_series_are_refused_with_the_fix() {
        let s = parse_answer(200, &vector(MAX_SERIES)).unwrap();
        assert_eq!(s.len(), MAX_SERIES);
        assert_eq!(s[MAX_SERIES - 1].value, (MAX_SERIES - 1).to_string());
        let e = parse_answer(200, &vector(MAX_SERIES + 1)).unwrap_err();
        assert!(matches!(e, QueryError::TooLarge(_)), "{e:?}");
        assert_eq!(
            e.to_string(),
            "answer too large: the query returns more than 20000 series; aggregate it to one series per node, e.g. sum by (instance) (rate(...[2m]))"
        );
    }

    #[tokio::test]
    async fn big_bodies_are_not_read() {
        let ok = vector(3);
        let got = read_capped(Full::new(Bytes::from(ok.clone())), None, 1 << 20)
            .await
            .unwrap();
        assert_eq!(parse_answer(200, &got).unwrap().len(), 3);
        let big = Bytes::from(vec![b' '; MAX_ANSWER + 1]);
        let want = "answer too large: Prometheus answered more than 8 MiB; the query returns too many series: aggregate it to one series per node, e.g. sum by (instance) (rate(...[2m]))";
        // Found while reading, and from Content-Length before reading.
        let e = read_capped(Full::new(big.clone()), None, MAX_ANSWER)
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), want);
        let e = read_capped(Full::new(Bytes::new()), Some(big.len() as u64), MAX_ANSWER)
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), want);
        // Exactly the cap is read.
        let at = read_capped(Full::new(big.slice(1..)), None, MAX_ANSWER)
            .await
            .unwrap();
        assert_eq!(at.len(), MAX_ANSWER);
    }
}
