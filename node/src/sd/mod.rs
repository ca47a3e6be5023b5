//! The Stable Diffusion 1.x/2.x pipeline on Burn: CLIP text encoder, UNet, VAE decoder and the
//! LCM scheduler, loaded from diffusers folders or single-file checkpoints, LoRAs merged at load.
//!
//! Every module is generic over the Burn backend: [`Cpu`] (the pure-Rust `flex` backend) always,
//! `Gpu` (burn-cuda) with the `cuda` feature.

pub mod clip;
pub mod lcm;
pub mod lora;
pub mod nn;
pub mod pipeline;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

/// The CPU backend (burn `flex`, f32).
pub type Cpu = burn::backend::Flex;

/// The CUDA backend (burn-cuda, f32 compute).
#[cfg(feature = "cuda")]
pub type Gpu = burn::backend::Cuda;
