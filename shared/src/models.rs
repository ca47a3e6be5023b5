//! Orders about a node's catalogued models, as the coordinator's REST API takes them and the
//! session carries them to the node.

use serde::{Deserialize, Serialize};

/// What an order about a node's model asks (`POST /v1/nodes/{id}/models/{model}/{action}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ModelAction {
    /// Load a copy now, evicting idle models as a job would.
    Load,
    /// Drop its idle copies (refused by the node while it is pinned).
    Unload,
    /// Load it and never evict it.
    Pin,
    /// Evictable again.
    Unpin,
}

impl ModelAction {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Load => "load",
            Self::Unload => "unload",
            Self::Pin => "pin",
            Self::Unpin => "unpin",
        }
    }
}

impl std::str::FromStr for ModelAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [Self::Load, Self::Unload, Self::Pin, Self::Unpin]
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| format!("model action `{s}` (load, unload, pin or unpin)"))
    }
}
