//! The node's error enum.

/// Result alias for the node.
pub type Result<T, E = NodeError> = std::result::Result<T, E>;

/// Everything that can go wrong in a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration cannot work (named setting and why).
    #[error("configuration: {0}")]
    Config(String),
    /// The model (or a LoRA) cannot be identified.
    #[error("model: {0}")]
    Model(#[from] drover_shared::detect::DetectError),
    /// The chosen backend cannot start (missing driver, library or model support).
    #[error("backend {backend}: {message}")]
    Backend {
        /// Backend name.
        backend: &'static str,
        /// What is missing.
        message: String,
    },
    /// The coordinator refused this node for good (wrong token, invalid registration).
    #[error("coordinator refused this node: {0}")]
    Refused(String),
    /// The coordinator could not be reached or the session broke.
    #[error("coordinator link: {0}")]
    Link(String),
    /// A weights file cannot be read.
    #[error("weights: {0}")]
    Weights(String),
    /// A tensor the model needs is not in its file.
    #[error("weights: {file} has no tensor {name}")]
    MissingTensor {
        /// The file (or folder) searched.
        file: String,
        /// The tensor (file name, and the module name when they differ).
        name: String,
    },
    /// A tensor has the wrong shape.
    #[error("weights: tensor {name} has shape {found:?}, the model expects {expected:?}")]
    TensorShape {
        /// Tensor name in the file.
        name: String,
        /// Expected shape.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
    /// A tensor's element type cannot hold weights.
    #[error("weights: tensor {name} is {dtype}; weights must be f32, f16, bf16 or f64")]
    TensorDtype {
        /// Tensor name.
        name: String,
        /// Its dtype.
        dtype: &'static str,
    },
    /// A model config is missing, unreadable or describes an unsupported shape.
    #[error("model config: {0}")]
    ModelConfig(String),
    /// The tokenizer cannot be loaded or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A LoRA cannot be merged into this model.
    #[error("lora {0}")]
    Lora(String),
    /// The job was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// The job cannot be rendered by this node (bad parameters).
    #[error("invalid job: {0}")]
    InvalidJob(String),
    /// An RKNN runtime call failed; `status` says what the runtime's code means.
    #[cfg(feature = "rknn")]
    #[error("rknn: {call} on {model} returned {status}")]
    Rknn {
        /// The C function (and query) that failed.
        call: &'static str,
        /// The `.rknn` file of the context.
        model: String,
        /// The runtime's status.
        status: crate::rknn::api::RknnStatus,
    },
    /// Rendering or encoding failed.
    #[error("render failed: {0}")]
    Render(String),
}

impl NodeError {
    /// Whether retrying the job elsewhere would fail the same way.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::InvalidJob(_))
    }
}

impl From<tonic::transport::Error> for NodeError {
    fn from(e: tonic::transport::Error) -> Self {
        Self::Link(format!("{e}: {}", source_chain(&e)))
    }
}

impl From<tonic::Status> for NodeError {
    fn from(s: tonic::Status) -> Self {
        match s.code() {
            tonic::Code::Unauthenticated
            | tonic::Code::PermissionDenied
            | tonic::Code::InvalidArgument => Self::Refused(s.message().to_string()),
            _ => Self::Link(format!("{}: {}", s.code(), s.message())),
        }
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut source = e.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.join(": ")
}
