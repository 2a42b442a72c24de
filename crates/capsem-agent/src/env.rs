//! The base environment of every process the agent starts (exec jobs and terminals); request
//! variables are layered on top and win.

pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Default working directory.
pub const HOME: &str = "/root";

pub const BASE: &[(&str, &str)] = &[
    ("PATH", PATH),
    ("HOME", HOME),
    ("USER", "root"),
    ("LOGNAME", "root"),
    ("SHELL", "/bin/bash"),
    ("LANG", "C.UTF-8"),
    // The capsem CA (installed by `ControlRequest::TrustCa`) for clients that do not read
    // the system bundle.
    ("SSL_CERT_FILE", SYSTEM_BUNDLE),
    ("REQUESTS_CA_BUNDLE", SYSTEM_BUNDLE),
    ("NODE_EXTRA_CA_CERTS", CA_FILE),
];

/// Debian's OpenSSL trust bundle; the capsem CA is appended to it.
pub const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The capsem CA certificate alone.
pub const CA_FILE: &str = "/usr/local/share/ca-certificates/capsem-ca.crt";

/// Clear the command's environment, then apply the base and the `extra` variables in order.
pub fn apply<'a>(
    cmd: &mut tokio::process::Command,
    extra: impl IntoIterator<Item = (&'a str, &'a str)>,
) {
    cmd.env_clear();
    for (k, v) in BASE {
        cmd.env(k, v);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
}
