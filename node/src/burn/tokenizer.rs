//! The CLIP BPE tokenizer, through the `tokenizers` crate, from a model folder's `tokenizer/`:
//! either a `tokenizer.json` or the `vocab.json` + `merges.txt` pair (assembled into the same
//! pipeline Hugging Face's CLIP converter builds). Prompts become exactly 77 ids: start token,
//! at most 75 prompt tokens, end token, padding.

use std::path::Path;

use serde_json::{Value, json};
use tokenizers::Tokenizer;

use crate::error::{NodeError, Result};

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

/// A loaded CLIP tokenizer.
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    length: usize,
}

/// A tokenized prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokens {
    /// Exactly `length` ids.
    pub ids: Vec<u32>,
    /// Prompt tokens dropped to fit (0 when the prompt fit).
    pub truncated: usize,
}

fn err(dir: &Path, m: impl std::fmt::Display) -> NodeError {
    NodeError::Tokenizer(format!("{}: {m}", dir.display()))
}

impl ClipTokenizer {
    /// Loads the tokenizer in `dir` (`tokenizer.json`, or `vocab.json` + `merges.txt`).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json_path = dir.join("tokenizer.json");
        let inner = if json_path.is_file() {
            Tokenizer::from_file(&json_path).map_err(|e| err(dir, e))?
        } else if dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file() {
            let spec = clip_spec(dir)?;
            spec.to_string()
                .parse::<Tokenizer>()
                .map_err(|e| err(dir, e))?
        } else {
            return Err(err(
                dir,
                "no tokenizer found: expected tokenizer.json or vocab.json + merges.txt",
            ));
        };
        let id = |t: &str| {
            inner
                .token_to_id(t)
                .ok_or_else(|| err(dir, format!("vocabulary lacks {t}")))
        };
        let (bos, eos) = (id(BOS)?, id(EOS)?);
        let pad = match pad_token(dir) {
            Some(t) => id(&t)?,
            None => eos,
        };
        Ok(Self {
            inner,
            bos,
            eos,
            pad,
            length: 77,
        })
    }

    /// Vocabulary size (including the special tokens).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Tokenizes `prompt` into exactly 77 ids, truncating as diffusers does (and saying so).
    pub fn encode(&self, prompt: &str) -> Result<Tokens> {
        let enc = self
            .inner
            .encode(prompt, false)
            .map_err(|e| NodeError::Tokenizer(format!("cannot tokenize the prompt: {e}")))?;
        let body = enc.get_ids();
        let room = self.length - 2;
        let kept = body.len().min(room);
        let mut ids = Vec::with_capacity(self.length);
        ids.push(self.bos);
        ids.extend_from_slice(&body[..kept]);
        ids.push(self.eos);
        ids.resize(self.length, self.pad);
        Ok(Tokens {
            ids,
            truncated: body.len() - kept,
        })
    }
}

/// The pad token named in `tokenizer_config.json` or `special_tokens_map.json`, if any.
fn pad_token(dir: &Path) -> Option<String> {
    for file in ["tokenizer_config.json", "special_tokens_map.json"] {
        let Ok(text) = std::fs::read_to_string(dir.join(file)) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        match v.get("pad_token") {
            Some(Value::String(s)) => return Some(s.clone()),
            Some(Value::Object(o)) => {
                if let Some(Value::String(s)) = o.get("content") {
                    return Some(s.clone());
                }
            }
            _ => {}
        }
    }
    None
}

/// The `tokenizer.json` equivalent of a CLIP `vocab.json` + `merges.txt` pair.
fn clip_spec(dir: &Path) -> Result<Value> {
    let vocab_text = std::fs::read_to_string(dir.join("vocab.json")).map_err(|e| err(dir, e))?;
    let vocab: serde_json::Map<String, Value> =
        serde_json::from_str(&vocab_text).map_err(|e| err(dir, format!("vocab.json: {e}")))?;
    let merges_text = std::fs::read_to_string(dir.join("merges.txt")).map_err(|e| err(dir, e))?;
    let merges: Vec<Value> = merges_text
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .map(|l| {
            let mut parts = l.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => Ok(json!([a, b])),
                _ => Err(err(dir, format!("merges.txt: bad line {l:?}"))),
            }
        })
        .collect::<Result<_>>()?;
    let id = |t: &str| {
        vocab
            .get(t)
            .and_then(Value::as_u64)
            .ok_or_else(|| err(dir, format!("vocab.json lacks {t}")))
    };
    let (bos, eos) = (id(BOS)?, id(EOS)?);
    let special = |t: &str, i: u64| {
        json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(BOS, bos), special(EOS, eos)],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex":
                "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"},
             "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": EOS, "continuing_subword_prefix": "",
            "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges
        }
    }))
}
