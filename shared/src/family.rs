//! Model families and the facts the scheduler needs about them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A Stable Diffusion model family, as detected from a checkpoint's cross-attention width.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ModelFamily {
    /// SD 1.x (cross-attention dim 768).
    Sd15,
    /// SD 2.x (cross-attention dim 1024).
    Sd2,
    /// SDXL base (cross-attention dim 2048).
    Sdxl,
    /// SDXL refiner (cross-attention dim 1280); not a text-to-image base model.
    SdxlRefiner,
}

impl ModelFamily {
    /// Every family, in display order.
    pub const ALL: [ModelFamily; 4] = [Self::Sd15, Self::Sd2, Self::Sdxl, Self::SdxlRefiner];

    /// The family's wire name (`sd15`, `sd2`, `sdxl`, `sdxl_refiner`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sd15 => "sd15",
            Self::Sd2 => "sd2",
            Self::Sdxl => "sdxl",
            Self::SdxlRefiner => "sdxl_refiner",
        }
    }

    /// Width of the text conditioning the UNet cross-attends to.
    pub fn cross_attention_dim(self) -> u32 {
        match self {
            Self::Sd15 => 768,
            Self::Sd2 => 1024,
            Self::Sdxl => 2048,
            Self::SdxlRefiner => 1280,
        }
    }

    /// The family whose UNet has this cross-attention width, if any.
    pub fn from_cross_attention_dim(dim: u32) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|f| f.cross_attention_dim() == dim)
    }

    /// Image size used when a request does not give one (the resolution the family was trained at).
    pub fn default_size(self) -> (u32, u32) {
        match self {
            Self::Sd15 => (512, 512),
            Self::Sd2 => (768, 768),
            Self::Sdxl | Self::SdxlRefiner => (1024, 1024),
        }
    }

    /// Whether the family can generate an image from text alone (the refiner cannot).
    pub fn is_text_to_image(self) -> bool {
        !matches!(self, Self::SdxlRefiner)
    }
}

impl fmt::Display for ModelFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error for a string that names no model family.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown model family `{0}`: expected one of sd15, sd2, sdxl, sdxl_refiner")]
pub struct UnknownFamily(pub String);

impl FromStr for ModelFamily {
    type Err = UnknownFamily;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "sd15" | "sd1.5" | "sd1" | "sd1x" => Ok(Self::Sd15),
            "sd2" | "sd2.1" | "sd21" | "sd2x" => Ok(Self::Sd2),
            "sdxl" => Ok(Self::Sdxl),
            "sdxl_refiner" | "sdxl-refiner" => Ok(Self::SdxlRefiner),
            _ => Err(UnknownFamily(s.chars().take(64).collect())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_attention_dims_identify_families() {
        for (dim, family) in [
            (768, ModelFamily::Sd15),
            (1024, ModelFamily::Sd2),
            (2048, ModelFamily::Sdxl),
            (1280, ModelFamily::SdxlRefiner),
        ] {
            assert_eq!(ModelFamily::from_cross_attention_dim(dim), Some(family));
            assert_eq!(family.cross_attention_dim(), dim);
        }
        assert_eq!(ModelFamily::from_cross_attention_dim(512), None);
    }

    #[test]
    fn names_round_trip() {
        for family in ModelFamily::ALL {
            assert_eq!(family.as_str().parse::<ModelFamily>(), Ok(family));
            let json = serde_json::to_string(&family).unwrap_or_default();
            assert_eq!(json, format!("\"{family}\""));
        }
        assert!("sd3".parse::<ModelFamily>().is_err());
    }
}
