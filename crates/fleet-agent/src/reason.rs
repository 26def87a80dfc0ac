//! Why something an instance needs is not there yet, typed: the controller decides on the
//! reason (is it progress? a backoff?), and shows the message.

/// The reason, as the `Progressing` condition and the instance's message name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// An image pull (or a tag's resolution) is under way.
    Pulling,
    /// containerd could not say whether the image is there.
    ErrImageInspect,
    /// A pull failed; the next attempt waits for its backoff.
    ImagePullBackOff,
    /// The image is absent and `imagePullPolicy` is `Never`.
    ErrImageNeverPull,
    /// The model is being checked, pulled or given its thread count.
    PreparingModel,
    /// Preparing the model failed; the next attempt waits for its backoff.
    ModelPullBackOff,
}

impl Reason {
    /// The condition reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Pulling => "Pulling",
            Reason::ErrImageInspect => "ErrImageInspect",
            Reason::ImagePullBackOff => "ImagePullBackOff",
            Reason::ErrImageNeverPull => "ErrImageNeverPull",
            Reason::PreparingModel => "PreparingModel",
            Reason::ModelPullBackOff => "ModelPullBackOff",
        }
    }

    /// Whether waiting for this is progress (`Progressing=True`): work is under way, not
    /// failed or impossible.
    pub fn is_progress(self) -> bool {
        matches!(self, Reason::Pulling | Reason::PreparingModel)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Waiting, with why: the reason, and the message shown to users (which, as in Kubernetes,
/// may start with the reason: `ImagePullBackOff: pulling "x" failed ...`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiting {
    /// Why.
    pub reason: Reason,
    /// What to show.
    pub message: String,
}

impl Waiting {
    /// Waiting for `reason`, saying `message`.
    pub fn new(reason: Reason, message: impl Into<String>) -> Waiting {
        Waiting {
            reason,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}
