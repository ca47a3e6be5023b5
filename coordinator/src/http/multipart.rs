//! A strict `multipart/form-data` reader (RFC 7578) for the one route that takes it (OpenAI's
//! image edits): the whole body in memory (already bounded by the route's limit), split on the
//! boundary, each part's `Content-Disposition` name and file name read. Anything malformed is
//! a client error naming `body`.

use drover_shared::error::FieldError;

/// One part of a form.
#[derive(Clone, Debug, PartialEq)]
pub struct Part {
    /// The field's name.
    pub name: String,
    /// The file name, for file fields.
    pub filename: Option<String>,
    /// The bytes.
    pub data: Vec<u8>,
}

fn bad(message: impl Into<String>) -> FieldError {
    FieldError::new("body", message)
}

/// The boundary a `multipart/form-data` content type names.
pub fn boundary(content_type: &str) -> Result<String, FieldError> {
    let mut params = content_type.split(';');
    let kind = params.next().unwrap_or("").trim();
    if !kind.eq_ignore_ascii_case("multipart/form-data") {
        return Err(bad(format!(
            "expected multipart/form-data, got `{}`",
            kind.chars().take(64).collect::<String>()
        )));
    }
    params
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v.trim().trim_matches('"').to_string())
        .filter(|b| !b.is_empty() && b.len() <= 70)
        .ok_or_else(|| bad("multipart/form-data without a boundary"))
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    (from..=haystack.len() - needle.len())
        .find(|&i| haystack[i] == needle[0] && &haystack[i..i + needle.len()] == needle)
}

/// The parts of `body`, a form whose content type is `content_type`.
pub fn parse(content_type: &str, body: &[u8]) -> Result<Vec<Part>, FieldError> {
    let boundary = boundary(content_type)?;
    let delimiter = format!("--{boundary}");
    let first = find(body, delimiter.as_bytes(), 0)
        .ok_or_else(|| bad("the form's boundary never appears"))?;
    let separator = format!("\r\n--{boundary}");
    let mut at = first + delimiter.len();
    let mut parts = Vec::new();
    loop {
        if body[at..].starts_with(b"--") {
            return Ok(parts);
        }
        if !body[at..].starts_with(b"\r\n") {
            return Err(bad("a form boundary is not followed by a line break"));
        }
        at += 2;
        let headers_end =
            find(body, b"\r\n\r\n", at).ok_or_else(|| bad("a form part has no end of headers"))?;
        let headers = std::str::from_utf8(&body[at..headers_end])
            .map_err(|_| bad("a form part's headers are not UTF-8"))?;
        let (name, filename) = disposition(headers)?;
        let data_start = headers_end + 4;
        let end = find(body, separator.as_bytes(), data_start)
            .ok_or_else(|| bad(format!("form part `{name}` is not closed by the boundary")))?;
        parts.push(Part {
            name,
            filename,
            data: body[data_start..end].to_vec(),
        });
        at = end + separator.len();
    }
}

/// The `name` and `filename` of a part's `Content-Disposition: form-data` header.
fn disposition(headers: &str) -> Result<(String, Option<String>), FieldError> {
    let line = headers
        .split("\r\n")
        .find(|l| {
            l.split_once(':')
                .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case("content-disposition"))
        })
        .ok_or_else(|| bad("a form part has no Content-Disposition"))?;
    let value = line.split_once(':').map_or("", |(_, v)| v);
    let param = |key: &str| {
        value.split(';').skip(1).find_map(|p| {
            let (k, v) = p.split_once('=')?;
            k.trim()
                .eq_ignore_ascii_case(key)
                .then(|| v.trim().trim_matches('"').to_string())
        })
    };
    let name = param("name").ok_or_else(|| bad("a form part has no name"))?;
    Ok((name, param("filename")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_split_into_named_parts_and_broken_ones_are_refused() {
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na fox\r\n\
--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"in.png\"\r\n\
Content-Type: image/png\r\n\r\n\x89PNG\r\n--X\x00\r\n--XyZ--\r\n";
        let parts = parse("multipart/form-data; boundary=\"XyZ\"", body).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(
            (parts[0].name.as_str(), &parts[0].data[..]),
            ("prompt", &b"a fox"[..])
        );
        assert_eq!(parts[1].filename.as_deref(), Some("in.png"));
        assert_eq!(
            &parts[1].data[..],
            b"\x89PNG\r\n--X\x00",
            "bytes kept as sent"
        );
        for (ct, body) in [
            ("application/json", &body[..]),
            ("multipart/form-data", &body[..]),
            ("multipart/form-data; boundary=Q", &body[..]),
            (
                "multipart/form-data; boundary=XyZ",
                &b"--XyZ\r\nno headers"[..],
            ),
            (
                "multipart/form-data; boundary=XyZ",
                &b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nopen"[..],
            ),
        ] {
            assert_eq!(parse(ct, body).unwrap_err().field, "body", "{ct}");
        }
    }
}
