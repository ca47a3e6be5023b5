//! The cpu and cuda backends: the Stable Diffusion 1.x/2.x/SDXL LCM pipeline on Burn (CLIP text
//! encoders, UNet, VAE decoder, LCM scheduler), loaded from diffusers folders or single-file
//! checkpoints with LoRAs merged at load, and [`renderer::BurnRenderer`], its
//! [`crate::render::Renderer`].
//!
//! Every module is generic over the Burn backend: [`Cpu`] (the pure-Rust `flex` backend) always,
//! `Gpu` (burn-cuda) with the `cuda` feature. This module shares its name with the `burn` crate:
//! inside it, the crate is spelled `::burn`.
//!
//! Module graph, leaves first: [`tensor_file`] (safetensors files → f32 host tensors),
//! `cuda_kernels` (the CUDA kernel choice), [`nn`] (with the CPU kernels of `drover-kernels`),
//! [`lora`], [`weights`] (the loader), [`tokenizer`], [`gpus`] (device placement); then
//! [`clip`], [`unet`], [`vae`], [`upscale`] (super-resolution networks, on their own);
//! then [`pipeline`]; then [`renderer`]. Nothing here depends on the session or the protocol.

pub mod clip;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod cuda_kernels;
pub mod denoise;
pub mod gpus;
pub mod lora;
pub mod nn;
pub mod pipeline;
pub mod renderer;
pub mod tensor_file;
pub mod tokenizer;
pub mod unet;
pub mod upscale;
pub mod vae;
pub mod weights;

/// The CPU backend (burn `flex`, f32).
pub type Cpu = ::burn::backend::Flex;

/// The CUDA backend (burn-cuda). Its pipelines store and compute in the dtypes of
/// [`pipeline::Precision`] (f16 by default), whatever the backend's default float type.
#[cfg(feature = "cuda")]
pub type Gpu = ::burn::backend::Cuda;
