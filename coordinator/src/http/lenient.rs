//! Reading the lenient compatibility bodies (the Python LCM server's, AUTOMATIC1111's): a JSON
//! object whose fields are read one by one, `null` as absent, fields nobody reads ignored, and
//! every field that is read checked, naming it on error.

use drover_shared::error::FieldError;
use serde_json::{Map, Value};

use crate::error::Result;

/// The body as a JSON object.
pub(crate) fn object(body: &[u8]) -> Result<Map<String, Value>> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(FieldError::new("body", "expected a JSON object").into()),
        Err(e) => Err(FieldError::new("body", format!("malformed json: {e}")).into()),
    }
}

/// A string field.
pub(crate) fn string(map: &Map<String, Value>, key: &str) -> Result<Option<String>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(FieldError::new(key, "expected a string").into()),
    }
}

/// A number field.
pub(crate) fn number(map: &Map<String, Value>, key: &str) -> Result<Option<f64>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(_) => Err(FieldError::new(key, "expected a number").into()),
    }
}

/// A whole-number field (`5` or `5.0`).
pub(crate) fn whole(map: &Map<String, Value>, key: &str) -> Result<Option<i64>> {
    match number(map, key)? {
        None => Ok(None),
        Some(v) if v.fract() == 0.0 && v.abs() < 1e15 => Ok(Some(v as i64)),
        Some(_) => Err(FieldError::new(key, "expected a whole number").into()),
    }
}

/// A non-negative whole-number field (steps).
pub(crate) fn steps(map: &Map<String, Value>, key: &str) -> Result<Option<u32>> {
    whole(map, key)?
        .map(|v| {
            u32::try_from(v).map_err(|_| FieldError::new(key, format!("{v} is negative")).into())
        })
        .transpose()
}

/// A seed where −1 (or absent) means random.
pub(crate) fn seed(map: &Map<String, Value>, key: &str) -> Result<Option<i64>> {
    Ok(whole(map, key)?.filter(|&s| s != -1))
}
