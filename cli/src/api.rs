//! The REST calls of the CLI: one `ureq` agent, the API key or admin token on each call, errors
//! as the server words them, and which replica to call when `DROVER_URL` lists several.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use super::Cli;

/// TLS settings trusting the public roots and the PEM certificates in `path`.
pub fn trusting(path: &std::path::Path) -> Result<ureq::tls::TlsConfig> {
    use ureq::tls::{Certificate, RootCerts, TlsConfig};
    let pem = std::fs::read(path).with_context(|| format!("DROVER_CA_CERT {}", path.display()))?;
    let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("DROVER_CA_CERT {}: not PEM", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "DROVER_CA_CERT {}: no certificate in it",
        path.display()
    );
    Ok(TlsConfig::builder()
        .root_certs(RootCerts::new_with_certs(&certs))
        .build())
}

pub(crate) struct Api {
    /// The coordinator (the leader, with replicas).
    pub(crate) url: String,
    admin_token: Option<String>,
    /// The API key, when one is set.
    pub(crate) api_key: Option<String>,
    /// The HTTP client.
    pub(crate) agent: ureq::Agent,
}

impl Api {
    pub(crate) fn new(cli: &Cli) -> Result<Self> {
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(10)));
        if let Some(path) = &cli.ca_cert {
            config = config.tls_config(trusting(path)?);
        }
        let agent: ureq::Agent = config.build().into();
        Ok(Self {
            url: leader_url(&agent, &cli.url),
            admin_token: cli.admin_token.clone(),
            api_key: cli.api_key.clone(),
            agent,
        })
    }

    /// Answers the JSON body, or the server's error message.
    pub(crate) fn json(&self, mut response: ureq::http::Response<ureq::Body>) -> Result<Value> {
        let status = response.status();
        let body: Value = response
            .body_mut()
            .read_json()
            .with_context(|| format!("the coordinator answered {status} without JSON"))?;
        if !status.is_success() {
            let message = body["error"]["message"].as_str().unwrap_or("no message");
            bail!("{status}: {message}");
        }
        Ok(body)
    }

    /// A GET with the API key, when one is set.
    pub(crate) fn get_request(
        &self,
        path: &str,
    ) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        let req = self.agent.get(format!("{}{path}", self.url));
        match &self.api_key {
            Some(k) => req.header("x-api-key", k),
            None => req,
        }
    }

    pub(crate) fn get(&self, path: &str) -> Result<Value> {
        let r = self
            .get_request(path)
            .call()
            .with_context(|| format!("cannot reach the coordinator at {}", self.url))?;
        self.json(r)
    }

    pub(crate) fn send(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let url = format!("{}{path}", self.url);
        let auth = self.admin_token.as_ref().map(|t| format!("Bearer {t}"));
        let key = self.api_key.clone().unwrap_or_default();
        let r = match (method, body) {
            ("DELETE", _) => self.agent.delete(&url).header("x-api-key", &key).call(),
            (_, Some(b)) => {
                let mut req = self.agent.post(&url).header("x-api-key", &key);
                if let Some(a) = &auth {
                    req = req.header("authorization", a);
                }
                req.send_json(b)
            }
            _ => {
                let mut req = self.agent.post(&url).header("x-api-key", &key);
                if let Some(a) = &auth {
                    req = req.header("authorization", a);
                }
                req.send_empty()
            }
        }
        .with_context(|| format!("cannot reach the coordinator at {}", self.url))?;
        self.json(r)
    }

    pub(crate) fn node_id(&self, name_or_id: &str) -> Result<String> {
        let nodes = self.get("/v1/nodes")?;
        nodes
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["name"] == name_or_id || n["id"] == name_or_id)
            .and_then(|n| n["id"].as_str().map(str::to_string))
            .ok_or_else(|| anyhow!("no node named or numbered {name_or_id}"))
    }
}

/// The URL calls go to: the only one of `list`, or, of a replicated coordinator's replicas, the
/// leader as the first replica that answers `GET /v1/cluster` names it (else the first).
fn leader_url(agent: &ureq::Agent, list: &str) -> String {
    let urls: Vec<&str> = list
        .split(',')
        .map(|u| u.trim().trim_end_matches('/'))
        .filter(|u| !u.is_empty())
        .collect();
    let first = urls.first().copied().unwrap_or(list).to_string();
    if urls.len() < 2 {
        return first;
    }
    for url in &urls {
        let answer = agent
            .get(format!("{url}/v1/cluster"))
            .config()
            .timeout_global(Some(Duration::from_secs(2)))
            .build()
            .call();
        let Ok(mut response) = answer else { continue };
        let Ok(cluster) = response.body_mut().read_json::<Value>() else {
            continue;
        };
        if let Some(leader) = cluster["leader_http"].as_str() {
            return leader.trim_end_matches('/').to_string();
        }
    }
    first
}
