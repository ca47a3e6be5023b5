//! The sandbox's REST calls: raw requests with or without a token, typed submissions and the
//! polls tests wait on (a job's end, a node's state).

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use super::ClusterSandbox;

/// An HTTP answer: status, headers and body.
#[derive(Clone, Debug)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Headers, names lowercase.
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl Reply {
    /// Panics unless the status is `status`, showing the body (the error) when it is not.
    #[track_caller]
    pub fn expect_status(&self, status: u16) -> &Self {
        assert_eq!(
            self.status,
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        self
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("body is not JSON: {}", String::from_utf8_lossy(&self.body)))
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl ClusterSandbox {
    fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Reply> {
        self.call_as(method, path, body, None)
    }

    /// `method path` with an optional raw JSON body, presenting `token` as
    /// `Authorization: Bearer` when given.
    pub fn call_as(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        token: Option<&str>,
    ) -> Result<Reply> {
        self.send(method, path, body, token, "application/json")
    }

    /// `POST path` with a raw body of `content_type` (a multipart form, an image).
    pub fn post_typed(&self, path: &str, content_type: &str, body: &[u8]) -> Result<Reply> {
        self.send("POST", path, Some(body), None, content_type)
    }

    /// `POST path` with a JSON body and extra request headers (e.g. `Idempotency-Key`).
    pub fn post_with_headers(
        &self,
        path: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> Result<Reply> {
        self.send_with(
            "POST",
            path,
            Some(&serde_json::to_vec(body)?),
            None,
            "application/json",
            headers,
        )
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        token: Option<&str>,
        content_type: &str,
    ) -> Result<Reply> {
        self.send_with(method, path, body, token, content_type, &[])
    }

    fn send_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        token: Option<&str>,
        content_type: &str,
        extra: &[(&str, &str)],
    ) -> Result<Reply> {
        let url = format!("{}{path}", self.base_url());
        let auth = token.map(|t| format!("Bearer {t}"));
        let with_auth = |r: ureq::RequestBuilder<ureq::typestate::WithoutBody>| match &auth {
            Some(a) => r.header("authorization", a),
            None => r,
        };
        let response = match (method, body) {
            ("GET", _) => with_auth(self.agent.get(&url)).call(),
            ("DELETE", _) => with_auth(self.agent.delete(&url)).call(),
            ("POST", Some(body)) => {
                let mut r = self.agent.post(&url).header("content-type", content_type);
                for (name, value) in extra {
                    r = r.header(*name, *value);
                }
                match &auth {
                    Some(a) => r.header("authorization", a).send(body),
                    None => r.send(body),
                }
            }
            ("POST", None) => match &auth {
                Some(a) => self
                    .agent
                    .post(&url)
                    .header("authorization", a)
                    .send_empty(),
                None => self.agent.post(&url).send_empty(),
            },
            _ => bail!("unsupported method {method}"),
        };
        let mut response = response.with_context(|| format!("{method} {path}"))?;
        let headers = response
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_ascii_lowercase(),
                    v.to_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()?;
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Result<Reply> {
        self.call("GET", path, None)
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> Result<Reply> {
        self.call("DELETE", path, None)
    }

    /// `POST path` without a body, as an admin presenting `token`.
    pub fn post_with_token(&self, path: &str, token: &str) -> Result<Reply> {
        self.call_as("POST", path, None, Some(token))
    }

    /// `POST path` with a raw body.
    pub fn post_raw(&self, path: &str, body: &[u8]) -> Result<Reply> {
        self.call("POST", path, Some(body))
    }

    /// `POST path` with a JSON body.
    pub fn post(&self, path: &str, body: &Value) -> Result<Reply> {
        self.post_raw(path, &serde_json::to_vec(body)?)
    }

    /// Submits jobs at once with `POST /v1/jobs/batch`; answers their ids in order.
    pub fn submit_batch(&self, jobs: &[Value]) -> Result<Vec<String>> {
        let reply = self.post("/v1/jobs/batch", &serde_json::json!({ "jobs": jobs }))?;
        if reply.status != 202 {
            bail!(
                "batch submit answered {}: {}",
                reply.status,
                String::from_utf8_lossy(&reply.body)
            );
        }
        Ok(reply.json()?["jobs"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|j| j["id"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Submits a job with `POST /v1/jobs`; answers its id.
    pub fn submit(&self, body: &Value) -> Result<String> {
        let reply = self.post("/v1/jobs", body)?;
        if reply.status != 202 {
            bail!(
                "submit answered {}: {}",
                reply.status,
                String::from_utf8_lossy(&reply.body)
            );
        }
        reply.json()?["id"]
            .as_str()
            .map(String::from)
            .ok_or_else(|| anyhow!("no id in reply"))
    }

    /// `GET /v1/jobs/{id}` as JSON.
    pub fn job(&self, id: &str) -> Result<Value> {
        let reply = self.get(&format!("/v1/jobs/{id}"))?;
        if reply.status != 200 {
            bail!("job {id}: status {}", reply.status);
        }
        reply.json()
    }

    /// Polls a job until it reaches a terminal state; answers it.
    pub fn wait_for_job(&self, id: &str, timeout: Duration) -> Result<Value> {
        let mut last = Value::Null;
        self.wait_until(timeout, &format!("job {id} finishes"), |s| {
            last = s.job(id)?;
            Ok(matches!(
                last["state"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ))
        })?;
        Ok(last)
    }

    /// `GET /v1/nodes`.
    pub fn nodes(&self) -> Result<Vec<Value>> {
        let reply = self.get("/v1/nodes")?;
        match reply.json()? {
            Value::Array(nodes) => Ok(nodes),
            other => bail!("/v1/nodes is not an array: {other}"),
        }
    }

    /// The state (`online`, `offline`, ...) of the node named `name`, if registered.
    pub fn node_state(&self, name: &str) -> Result<Option<String>> {
        Ok(self
            .nodes()?
            .iter()
            .find(|n| n["name"] == name)
            .and_then(|n| n["state"].as_str().map(String::from)))
    }

    /// The id of the node named `name`, if registered.
    pub fn node_id(&self, name: &str) -> Result<Option<String>> {
        Ok(self
            .nodes()?
            .iter()
            .find(|n| n["name"] == name)
            .and_then(|n| n["id"].as_str().map(String::from)))
    }

    /// Waits until every named node is online.
    pub fn wait_for_online(&self, names: &[&str], timeout: Duration) -> Result<()> {
        self.wait_until(timeout, &format!("nodes {names:?} are online"), |s| {
            let nodes = s.nodes()?;
            Ok(names.iter().all(|name| {
                nodes
                    .iter()
                    .any(|n| n["name"] == *name && n["state"] == "online")
            }))
        })
    }

    /// Waits until the named node is in `state`.
    pub fn wait_for_state(&self, name: &str, state: &str, timeout: Duration) -> Result<()> {
        self.wait_until(timeout, &format!("node {name} is {state}"), |s| {
            Ok(s.node_state(name)?.as_deref() == Some(state))
        })
    }
}
