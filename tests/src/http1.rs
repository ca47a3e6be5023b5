//! A minimal HTTP/1.1 keep-alive client for the load generator: one connection, one request at
//! a time, `Content-Length` bodies only.
//!
//! The load generator shares the machine with the coordinator and the nodes it measures, so its
//! own cost per request is kept to two system calls and no allocation beyond the reused buffer;
//! a general client (TLS, redirects, chunked bodies, pooling) would spend the CPU being measured.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// One keep-alive connection to an HTTP/1.1 server.
pub struct Connection {
    addr: SocketAddr,
    host: String,
    stream: Option<TcpStream>,
    request: Vec<u8>,
    buf: Vec<u8>,
}

/// A response: status and body.
#[derive(Debug)]
pub struct Response<'a> {
    /// HTTP status.
    pub status: u16,
    /// The body bytes (borrowed from the connection's buffer until the next request).
    pub body: &'a [u8],
    /// Whether the server said `Idempotent-Replayed: true` (an answer given again for an
    /// `Idempotency-Key` it had seen).
    pub replayed: bool,
}

impl Connection {
    /// A connection to `addr` (opened on first use, reopened when the server closes it).
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            host: addr.to_string(),
            stream: None,
            request: Vec::with_capacity(512),
            buf: Vec::with_capacity(64 * 1024),
        }
    }

    fn stream(&mut self) -> Result<&mut TcpStream> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(self.addr)
                .with_context(|| format!("connecting to {}", self.addr))?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(Duration::from_secs(60)))?;
            self.stream = Some(stream);
        }
        self.stream.as_mut().context("no connection")
    }

    /// Sends `POST path` with a JSON `body` and reads the whole response.
    pub fn post_json(&mut self, path: &str, body: &[u8]) -> Result<Response<'_>> {
        self.post_keyed(path, body, None)
    }

    /// [`Connection::post_json`] with an `Idempotency-Key` header when `key` is given.
    pub fn post_keyed(
        &mut self,
        path: &str,
        body: &[u8],
        key: Option<&str>,
    ) -> Result<Response<'_>> {
        self.request.clear();
        write!(
            self.request,
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            self.host,
            body.len()
        )?;
        if let Some(key) = key {
            write!(self.request, "Idempotency-Key: {key}\r\n")?;
        }
        self.request.extend_from_slice(b"\r\n");
        self.request.extend_from_slice(body);
        let request = std::mem::take(&mut self.request);
        let sent = self.stream()?.write_all(&request);
        self.request = request;
        if let Err(e) = sent {
            self.stream = None;
            return Err(e).context("sending the request");
        }
        match self.read_response() {
            Ok((status, start, end, keep_alive, replayed)) => {
                if !keep_alive {
                    self.stream = None;
                }
                Ok(Response {
                    status,
                    body: &self.buf[start..end],
                    replayed,
                })
            }
            Err(e) => {
                self.stream = None;
                Err(e)
            }
        }
    }

    /// Reads one response into `buf`; answers (status, body start, body end, keep-alive,
    /// replayed).
    fn read_response(&mut self) -> Result<(u16, usize, usize, bool, bool)> {
        self.buf.clear();
        let stream = self.stream.as_mut().context("no connection")?;
        let mut chunk = [0u8; 16 * 1024];
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                bail!("the server closed the connection mid-response");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        };
        let head = std::str::from_utf8(&self.buf[..head_end]).context("response head")?;
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {status_line:?}"))?;
        let mut length = None;
        let mut keep_alive = true;
        let mut replayed = false;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("idempotent-replayed") {
                replayed = value.eq_ignore_ascii_case("true");
            }
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.parse::<usize>().context("content-length")?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                bail!("transfer-encoding {value} is not supported by this client");
            } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close")
            {
                keep_alive = false;
            }
        }
        let length = length.context("response without content-length")?;
        while self.buf.len() < head_end + length {
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                bail!("the server closed the connection mid-body");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        Ok((status, head_end, head_end + length, keep_alive, replayed))
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn reads_keep_alive_responses_split_across_reads() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            for reply in [&b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"[..], b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}"] {
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).unwrap();
                got.push(String::from_utf8_lossy(&buf[..n]).to_string());
                // Head and body in separate writes.
                let split = reply.len() - 2;
                s.write_all(&reply[..split]).unwrap();
                s.flush().unwrap();
                std::thread::sleep(Duration::from_millis(5));
                s.write_all(&reply[split..]).unwrap();
            }
            got
        });
        let mut c = Connection::new(addr);
        let r = c.post_json("/v1/generate", b"{\"a\":1}").unwrap();
        assert_eq!((r.status, r.body), (200, &b"hello"[..]));
        let r = c.post_json("/v1/generate", b"{}").unwrap();
        assert_eq!((r.status, r.body), (429, &b"{}"[..]));
        assert!(c.stream.is_none(), "connection: close is honoured");
        let requests = server.join().unwrap();
        assert!(requests[0].starts_with("POST /v1/generate HTTP/1.1\r\n"));
        assert!(requests[0].contains("Content-Length: 7\r\n"));
        assert!(requests[0].ends_with("\r\n\r\n{\"a\":1}"));
    }
}
