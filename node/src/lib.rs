//! Drover node: detects what it can serve, starts worker actors through the [`factory`], and
//! keeps a gRPC session with the coordinator ([`session`]).
//!
//! Layout: [`config`] (env contract and CLI), [`factory`] (model detection, backend choice, LoRA
//! scan, worker creation, capabilities), [`render`] (the backend-neutral job → image interface:
//! [`render::Renderer`] and the one worker actor every backend runs in), the backends
//! ([`mod@burn`]: cpu and cuda; `rknn`: the RK3588 NPU; [`sim`]: simulated), [`session`]
//! (registration, heartbeats, assignments, reconnects) with [`convert`] (protocol messages into
//! the node's types), [`upscaling`] (the `UPSCALER` networks run after generation), [`inspect`]
//! and [`tools`] (the CLI tools), [`error`].

pub mod burn;
pub mod catalog;
pub mod config;
pub mod convert;
pub mod error;
pub mod factory;
pub mod inspect;
pub mod render;
pub mod residency;
#[cfg(feature = "rknn")]
pub mod rknn;
pub mod sampling;
pub mod session;
pub mod sim;
pub mod tools;
pub mod upscaling;

use std::process::ExitCode;

pub use config::NodeConfig;

/// Entry point of the `drover-node` binary.
pub fn cli_main() -> ExitCode {
    use clap::Parser;
    // Logs go to stderr: the tools print their results (JSON) on stdout.
    drover_shared::init_logging("drover-node");
    let cli = config::Cli::parse();
    if let Some(config::Command::Inspect { path, json }) = cli.command {
        return match inspect::run(&path, json) {
            Ok(text) => {
                print!("{text}");
                if json {
                    println!();
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("drover-node inspect: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match cli.command {
        Some(config::Command::MakeModel {
            out,
            seed,
            upscaler: Some(scale),
            arch,
            features,
            depth,
            ..
        }) => {
            return report(
                "make-model",
                upscaling::make_upscaler(&out, seed, &scale, &arch, features, depth).map(|label| {
                    format!(
                        "demo upscaler (random weights), {label}, written to {}\n",
                        out.display()
                    )
                }),
            );
        }
        Some(config::Command::Upscale {
            model,
            image,
            out,
            passes,
            scale,
            tile,
            pad,
            warmup,
        }) => {
            let run = upscaling::UpscaleRun {
                model: &model,
                image: &image,
                out: &out,
                spec: drover_shared::job::UpscaleSpec {
                    model: None,
                    passes,
                    scale,
                    elsewhere: false,
                },
                tile,
                pad,
                warmup,
            };
            return report("upscale", upscaling::upscale_cli(&run));
        }
        Some(config::Command::MakeModel {
            out,
            seed,
            family,
            variant,
            ..
        }) => {
            return report(
                "make-model",
                tools::make_model(&out, seed, family, &variant).map(|()| {
                    format!("demo model (random weights) written to {}\n", out.display())
                }),
            );
        }
        Some(config::Command::MakeLora {
            model,
            out,
            rank,
            seed,
        }) => {
            return report(
                "make-lora",
                tools::make_lora(&model, &out, rank, seed).map(|pairs| {
                    format!(
                        "demo lora (random weights, {pairs} modules) written to {}\n",
                        out.display()
                    )
                }),
            );
        }
        Some(config::Command::LdmNames { unet, vae }) => {
            return report(
                "ldm-names",
                tools::ldm_names(unet.as_deref(), vae.as_deref()),
            );
        }
        Some(config::Command::UnetEval {
            unet,
            inputs,
            output,
            config,
            lora,
            lora_scale,
            device,
        }) => {
            let o = tools::UnetEval {
                unet: &unet,
                inputs: &inputs,
                output: &output,
                config: config.as_deref(),
                lora: lora.as_deref(),
                lora_scale,
                device: &device,
            };
            return report("unet-eval", tools::unet_eval(&o).map(|()| String::new()));
        }
        Some(config::Command::ComponentEval {
            component,
            model,
            inputs,
            output,
            device,
        }) => {
            let o = tools::ComponentEval {
                component: &component,
                model: &model,
                inputs: &inputs,
                output: &output,
                device: &device,
            };
            return report(
                "component-eval",
                tools::component_eval(&o).map(|()| String::new()),
            );
        }
        Some(config::Command::BenchUnet {
            shape,
            size,
            runs,
            warmup,
            device,
        }) => {
            return report(
                "bench-unet",
                tools::bench_cli(&shape, size, runs, warmup, &device),
            );
        }
        Some(config::Command::BenchLora { model, lora, runs }) => {
            return report("bench-lora", tools::bench_lora_cli(&model, &lora, runs));
        }
        Some(config::Command::Ready { file }) => {
            return if file.exists() {
                ExitCode::SUCCESS
            } else {
                eprintln!("drover-node: not ready ({} is absent)", file.display());
                ExitCode::FAILURE
            };
        }
        Some(config::Command::BenchLoad { model, runs }) => {
            return report("bench-load", tools::bench_load_cli(&model, runs));
        }
        Some(config::Command::Render {
            model,
            device,
            warmup,
            args,
            batch,
            out,
        }) => {
            let run = tools::RenderRun {
                model: &model,
                device: &device,
                warmup,
                batch: batch as usize,
                out: &out,
            };
            return report("render", tools::render_cli(&run, args));
        }
        _ => {}
    }
    let config = cli.node;
    let result = actix_rt::System::new().block_on(async move {
        let pool = factory::build(&config)?;
        tokio::select! {
            r = session::NodeLink::new(config, pool).run() => r,
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("interrupted, stopping");
                Ok(())
            }
        }
    });
    drover_shared::telemetry::shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "node stopped");
            eprintln!("drover-node: {e}");
            ExitCode::from(2)
        }
    }
}

fn report(tool: &str, result: error::Result<String>) -> ExitCode {
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("drover-node {tool}: {e}");
            ExitCode::FAILURE
        }
    }
}
