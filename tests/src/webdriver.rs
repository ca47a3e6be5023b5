//! A small blocking W3C WebDriver client (over the sandbox's HTTP client), enough to drive
//! headless Chromium through chromedriver in the dashboard's browser test: sessions, navigation,
//! script execution, CSS lookups, clicks, typing, page source and screenshots.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

/// The key W3C WebDriver gives element references under.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// One browser session.
pub struct Browser {
    agent: ureq::Agent,
    session: String,
}

/// An element of the current page.
pub struct Element<'a> {
    browser: &'a Browser,
    id: String,
}

impl Browser {
    /// Opens a session on the WebDriver server at `driver` (e.g. chromedriver's
    /// `http://127.0.0.1:PORT`) with these capabilities (`alwaysMatch`).
    pub fn start(driver: &str, capabilities: Value) -> Result<Self> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let mut browser = Self {
            agent,
            session: format!("{}/session", driver.trim_end_matches('/')),
        };
        let answer = browser.call(
            "POST",
            "",
            Some(json!({"capabilities": {"alwaysMatch": capabilities}})),
        )?;
        let id = answer["sessionId"]
            .as_str()
            .context("the new session has no id")?;
        browser.session = format!("{}/{id}", browser.session);
        Ok(browser)
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let url = format!("{}{path}", self.session);
        let response = match method {
            "GET" => self.agent.get(&url).call(),
            "DELETE" => self.agent.delete(&url).call(),
            _ => self
                .agent
                .post(&url)
                .header("content-type", "application/json")
                .send(serde_json::to_vec(&body.unwrap_or_else(|| json!({})))?.as_slice()),
        };
        let mut response = response.with_context(|| format!("webdriver {method} {path}"))?;
        let status = response.status();
        let value: Value = response
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_json()
            .with_context(|| format!("webdriver {method} {path}: no JSON"))?;
        if !status.is_success() {
            bail!(
                "webdriver {method} {path}: {status} {} {}",
                value["value"]["error"].as_str().unwrap_or(""),
                value["value"]["message"].as_str().unwrap_or("")
            );
        }
        Ok(value["value"].clone())
    }

    /// Loads `url` and waits for the page.
    pub fn goto(&self, url: &str) -> Result<()> {
        self.call("POST", "/url", Some(json!({ "url": url })))
            .map(drop)
    }

    /// Runs `script` (a function body) in the page with `args`; answers what it returns.
    pub fn execute(&self, script: &str, args: Vec<Value>) -> Result<Value> {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
    }

    /// The first element matching the CSS selector.
    pub fn find(&self, css: &str) -> Result<Element<'_>> {
        let found = self.call(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        )?;
        self.element(&found)
    }

    /// Every element matching the CSS selector.
    pub fn find_all(&self, css: &str) -> Result<Vec<Element<'_>>> {
        let found = self.call(
            "POST",
            "/elements",
            Some(json!({"using": "css selector", "value": css})),
        )?;
        found
            .as_array()
            .context("elements: not a list")?
            .iter()
            .map(|e| self.element(e))
            .collect()
    }

    fn element(&self, reference: &Value) -> Result<Element<'_>> {
        let id = reference[ELEMENT]
            .as_str()
            .ok_or_else(|| anyhow!("not an element reference: {reference}"))?;
        Ok(Element {
            browser: self,
            id: id.to_string(),
        })
    }

    /// The page's current HTML.
    pub fn source(&self) -> Result<String> {
        Ok(self
            .call("GET", "/source", None)?
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// A PNG screenshot of the window.
    pub fn screenshot(&self) -> Result<Vec<u8>> {
        let encoded = self.call("GET", "/screenshot", None)?;
        base64_decode(encoded.as_str().context("screenshot: not a string")?)
    }

    /// Ends the session.
    pub fn close(self) -> Result<()> {
        self.call("DELETE", "", None).map(drop)
    }
}

impl Element<'_> {
    fn path(&self, tail: &str) -> String {
        format!("/element/{}{tail}", self.id)
    }

    /// Its visible text.
    pub fn text(&self) -> Result<String> {
        Ok(self
            .browser
            .call("GET", &self.path("/text"), None)?
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// Clicks it.
    pub fn click(&self) -> Result<()> {
        self.browser
            .call("POST", &self.path("/click"), Some(json!({})))
            .map(drop)
    }

    /// Types `text` into it.
    pub fn send_keys(&self, text: &str) -> Result<()> {
        self.browser
            .call("POST", &self.path("/value"), Some(json!({ "text": text })))
            .map(drop)
    }
}

/// Standard base64 (with or without padding) to bytes.
pub fn base64_decode(text: &str) -> Result<Vec<u8>> {
    let value = |c: u8| -> Result<u32> {
        Ok(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => bail!("not base64: {:?}", c as char),
        } as u32)
    };
    let digits: Vec<u8> = text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= value(c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_every_padding() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8h").unwrap(), b"hello!");
        assert_eq!(base64_decode("aGk=").unwrap(), b"hi");
        assert_eq!(base64_decode("").unwrap(), b"");
        assert!(base64_decode("a$b=").is_err());
    }
}
