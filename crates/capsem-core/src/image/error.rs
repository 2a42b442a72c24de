//! `ImageError`: every way building, loading or verifying the guest assets can fail, each variant
//! carrying its context and a message that says what to do next. Owns no logic.

use std::io;
use std::path::{Path, PathBuf};

/// What went wrong while building, loading or verifying the guest assets.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The version directory, its manifest or one of its files is absent.
    #[error("guest assets not found in {}: run `capsem setup`", dir.display())]
    Missing { dir: PathBuf },

    /// The assets are present but do not match their manifest.
    #[error("guest assets in {} are damaged ({reason}): run `capsem setup` to rebuild them", dir.display())]
    Corrupt { dir: PathBuf, reason: String },

    /// Host programs the build shells out to are not installed.
    #[error(
        "missing host tools: {} — install them with: sudo apt-get install {}",
        tools.join(", "),
        packages.join(" ")
    )]
    MissingTools {
        tools: Vec<&'static str>,
        packages: Vec<&'static str>,
    },

    /// The root filesystem must be built and we are not root.
    #[error(
        "building the guest root filesystem needs root (mmdebstrap unpacks Debian packages into a \
         directory as root): run `sudo capsem setup`"
    )]
    NotRoot,

    /// The capsem-agent binary to put in the initrd cannot be read.
    #[error(
        "cannot read the capsem-agent binary {}: build it first with \
         `cargo build --release -p capsem-agent --target x86_64-unknown-linux-musl`",
        path.display()
    )]
    Agent {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A name in the package list is not a Debian package name.
    #[error("invalid Debian package name {name:?} in the package list: use names like `python3` or `ca-certificates`")]
    InvalidPackage { name: String },

    /// apt metadata does not say which kernel to use, and no earlier build recorded one.
    #[error("cannot find which kernel package {package} points to ({reason}): run `sudo apt-get update` and try again")]
    KernelResolve {
        package: &'static str,
        reason: String,
    },

    /// The kernel package does not contain what we expect from a Debian kernel.
    #[error("the kernel package {package} has an unexpected layout: {reason}")]
    KernelLayout { package: String, reason: String },

    /// A host program could not be started at all.
    #[error("cannot start `{program}`")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },

    /// A host program ran and failed; `output_tail` holds its last lines of output.
    #[error("{step}: `{command}` failed ({status}){}", tail_suffix(output_tail))]
    CommandFailed {
        step: &'static str,
        command: String,
        status: String,
        output_tail: String,
    },

    /// `modules.dep` has a line we cannot read.
    #[error("{}:{line}: malformed modules.dep line: {reason}", path.display())]
    ModulesDep {
        path: PathBuf,
        line: usize,
        reason: String,
    },

    /// A module the initrd needs is not a module of this kernel.
    #[error(
        "kernel module `{name}` is not listed in {}: this kernel does not build it as a module; \
         the initrd module list needs updating",
        path.display()
    )]
    ModuleNotFound { name: String, path: PathBuf },

    /// `modules.dep` has a dependency cycle.
    #[error("kernel modules depend on each other in a cycle through `{name}` in {}", path.display())]
    ModuleCycle { name: String, path: PathBuf },

    /// A file is too large for a newc cpio entry (4 GiB).
    #[error("{} is too large for the initrd ({size} bytes; cpio newc holds at most 4 GiB per file)", path.display())]
    TooLarge { path: PathBuf, size: u64 },

    /// The manifest could not be encoded or decoded.
    #[error("cannot {action} the manifest {}", path.display())]
    Manifest {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A filesystem operation failed; `action` says which ("create", "read", …).
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn tail_suffix(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!(":\n{tail}")
    }
}

/// `map_err` helper: `fs::read(p).map_err(io_err("read", p))`.
pub(crate) fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ImageError {
    let path = path.to_path_buf();
    move |source| ImageError::Io {
        action,
        path,
        source,
    }
}
