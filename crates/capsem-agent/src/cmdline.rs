//! Parsing of the kernel command line (`/proc/cmdline`): the `capsem.*` keys the host sets and
//! the `virtio_mmio.*` parameters to hand to that module. Pure functions, no I/O.

/// What the agent takes from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmdline {
    /// `capsem.probe=1`: print the probe line and power off at once.
    pub probe: bool,
    /// `capsem.hostname=NAME`, default `capsem`.
    pub hostname: String,
    /// `capsem.trace=1`: print boot-profiling lines to the console.
    pub trace: bool,
    /// `capsem.seed=HEX`: random bytes from the host to seed the kernel RNG with.
    pub seed: Option<String>,
    /// `virtio_mmio.KEY=VALUE` entries as `KEY=VALUE`, space-separated, for `finit_module`.
    pub virtio_mmio_params: String,
}

pub const DEFAULT_HOSTNAME: &str = "capsem";

/// Split a command line into words, honouring double quotes as the kernel does.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

impl Cmdline {
    pub fn parse(line: &str) -> Cmdline {
        let mut c = Cmdline {
            probe: false,
            trace: false,
            seed: None,
            hostname: DEFAULT_HOSTNAME.to_string(),
            virtio_mmio_params: String::new(),
        };
        let mut mmio = Vec::new();
        for w in words(line) {
            let (key, val) = match w.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (w.as_str(), None),
            };
            match key {
                "capsem.probe" => c.probe = matches!(val, Some("1") | Some("true") | None),
                "capsem.trace" => c.trace = matches!(val, Some("1") | Some("true") | None),
                "capsem.seed" => c.seed = val.map(str::to_string),
                "capsem.hostname" => {
                    if let Some(v) = val.filter(|v| !v.is_empty()) {
                        c.hostname = v.to_string();
                    }
                }
                k => {
                    if let Some(param) = k
                        .strip_prefix("virtio_mmio.")
                        .or_else(|| k.strip_prefix("virtio-mmio."))
                    {
                        mmio.push(match val {
                            Some(v) => format!("{param}={v}"),
                            None => param.to_string(),
                        });
                    }
                }
            }
        }
        c.virtio_mmio_params = mmio.join(" ");
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = Cmdline::parse("console=ttyS0 quiet\n");
        assert!(!c.probe);
        assert_eq!(c.hostname, "capsem");
        assert_eq!(c.virtio_mmio_params, "");
    }

    #[test]
    fn capsem_keys_and_mmio_params() {
        let c = Cmdline::parse(
            "console=ttyS0 capsem.probe=1 capsem.hostname=box capsem.seed=00ff \
             virtio_mmio.device=512@0xfeb00e00:12 virtio_mmio.device=512@0xfeb00c00:11 other.x=1\n",
        );
        assert!(c.probe);
        assert!(!c.trace);
        assert_eq!(c.seed.as_deref(), Some("00ff"));
        assert_eq!(c.hostname, "box");
        assert_eq!(
            c.virtio_mmio_params,
            "device=512@0xfeb00e00:12 device=512@0xfeb00c00:11"
        );
    }

    #[test]
    fn probe_zero_and_quotes() {
        let c = Cmdline::parse("capsem.probe=0 capsem.hostname=\"a b\"");
        assert!(!c.probe);
        assert_eq!(c.hostname, "a b");
    }
}
