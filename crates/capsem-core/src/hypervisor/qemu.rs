//! QEMU `microvm` backend: command line, disk creation, and the KVM-or-TCG probe.
//!
//! KVM is decided by trying, not by the presence of `/dev/kvm`: on some hosts `/dev/kvm` exists
//! but cannot run a stock kernel (QEMU hangs or exits at once). The probe boots the real kernel and
//! initrd with `capsem.probe=1`, whose `/init` prints [`PROBE_MARKER`] and powers off; if that line
//! does not arrive in time, TCG is used. Under TCG the kernel gets `tsc_early_khz` from the host,
//! without which its PIT calibration sometimes fails and the boot hangs.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use super::{
    Accel, Hypervisor, HypervisorError, RunningVm, VmSpec, CHANNEL_SOCKET, CONTROL_SOCKET,
};

/// Line the agent prints in probe mode.
pub const PROBE_MARKER: &str = "CAPSEM-PROBE-OK";

/// Environment variable naming the QEMU binary (default: `qemu-system-x86_64` on PATH).
pub const QEMU_ENV: &str = "CAPSEM_QEMU";

pub struct Qemu {
    binary: PathBuf,
    img: PathBuf,
    accel: Accel,
}

impl Qemu {
    pub fn locate(accel: Accel) -> Result<Self, HypervisorError> {
        Ok(Qemu {
            binary: qemu_binary()?,
            img: find_program("qemu-img")
                .ok_or_else(|| HypervisorError::QemuMissing("qemu-img".into()))?,
            accel,
        })
    }

    /// The full argument list for `spec` (without the program name).
    pub fn args(&self, spec: &VmSpec) -> Vec<String> {
        let mut extra = vec![format!("capsem.hostname={}", spec.hostname)];
        extra.extend(spec.cmdline_extra.iter().cloned());
        let p = |p: &Path| p.display().to_string();
        let mut a = machine_args(self.accel, spec.ram_mb, spec.cpus);
        a.extend([
            "-chardev".into(),
            format!("file,id=serial0,path={},append=on", p(&spec.serial_log)),
            "-serial".into(),
            "chardev:serial0".into(),
            "-kernel".into(),
            p(&spec.kernel),
            "-initrd".into(),
            p(&spec.initrd),
            "-append".into(),
            kernel_cmdline(self.accel, &extra),
            "-drive".into(),
            format!(
                "id=rootfs,file={},format=raw,readonly=on,if=none",
                p(&spec.rootfs)
            ),
            "-device".into(),
            "virtio-blk-device,drive=rootfs,serial=capsem-rootfs".into(),
            "-drive".into(),
            format!(
                "id=disk,file={},format=qcow2,if=none,discard=unmap",
                p(&spec.disk)
            ),
            "-device".into(),
            "virtio-blk-device,drive=disk,serial=capsem-disk".into(),
            "-device".into(),
            // Two ports' worth of queues instead of 64: virtio_console probes faster.
            "virtio-serial-device,max_ports=2".into(),
            "-chardev".into(),
            // reconnect: after a hang-up QEMU dials again (once the host listens again), so a
            // resumed guest that missed the suspend's hang-up can be hung up on and start a
            // fresh session. Socket paths are relative to `socket_dir`, QEMU's working directory
            // (an address holds 107 bytes of path; the home may be deeper).
            format!("socket,id=channel0,path={CHANNEL_SOCKET},reconnect=1"),
            "-device".into(),
            format!(
                "virtserialport,chardev=channel0,name={}",
                capsem_proto::CHANNEL_PORT_NAME
            ),
            "-qmp".into(),
            format!("unix:{CONTROL_SOCKET},server=on,wait=off"),
        ]);
        if let Some(state) = &spec.incoming {
            // `exec:` runs through /bin/sh: quote the path.
            let quoted = p(state).replace('\'', "'\\''");
            a.extend(["-incoming".into(), format!("exec:cat '{quoted}'")]);
        }
        a
    }
}

impl Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn fingerprint(&self, spec: &VmSpec) -> String {
        use std::os::unix::fs::MetadataExt;
        // The binary by identity (a QEMU upgrade may change the migration format).
        let binary = std::fs::metadata(&self.binary)
            .map(|m| format!("{} {} {}", m.size(), m.mtime(), m.mtime_nsec()))
            .unwrap_or_default();
        // The TSC frequency hint only steers the boot's calibration, and the host's "cpu MHz"
        // moves on hosts that scale their clock: left out, or no restore would ever match.
        let args: Vec<String> = self
            .args(spec)
            .into_iter()
            .map(|a| {
                a.split(' ')
                    .filter(|w| !w.starts_with("tsc_early_khz="))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        // Under KVM the guest runs on the host's CPU model: a saved guest may only continue
        // on the same kernel and CPU features.
        let host = match self.accel {
            Accel::Kvm => format!(
                "{} {}",
                std::fs::read_to_string("/proc/sys/kernel/osrelease")
                    .unwrap_or_default()
                    .trim(),
                std::fs::read_to_string("/proc/cpuinfo")
                    .unwrap_or_default()
                    .lines()
                    .find(|l| l.starts_with("flags"))
                    .unwrap_or("")
            ),
            Accel::Tcg => String::new(),
        };
        format!(
            "{} [{binary}] [{host}] {}",
            self.binary.display(),
            args.join(" ")
        )
    }

    fn accel(&self) -> Accel {
        self.accel
    }

    fn create_disk(&self, backing: &Path, disk: &Path) -> Result<(), HypervisorError> {
        let format = if backing.extension().is_some_and(|e| e == "qcow2") {
            "qcow2"
        } else {
            "raw"
        };
        // A backing layer beside the disk is named relative to it, so the pair can be
        // hard-linked into another directory together (see `crate::disk`).
        let backing = match (backing.parent(), disk.parent(), backing.file_name()) {
            (Some(a), Some(b), Some(name)) if a == b => Path::new(name),
            _ => backing,
        };
        let out = std::process::Command::new(&self.img)
            .args(["create", "-q", "-f", "qcow2", "-F", format, "-b"])
            .arg(backing)
            .arg(disk)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| HypervisorError::Spawn {
                program: self.img.display().to_string(),
                source,
            })?;
        if !out.status.success() {
            return Err(HypervisorError::Disk(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        Ok(())
    }

    fn launch(&self, spec: &VmSpec) -> Result<RunningVm, HypervisorError> {
        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.args(self.args(spec))
            .current_dir(&spec.socket_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(|source| HypervisorError::Spawn {
            program: self.binary.display().to_string(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        Ok(RunningVm { child, pid })
    }
}

/// The guest's CPU under TCG: `qemu64` (no AES, SSSE3 or AVX: `-cpu max`, which emulates
/// them, measured slower for the guest's TLS, docs/benchmarks.md), plus the two flags
/// [`machine_args`] explains. [`guest_has_aes`] reads it.
const TCG_CPU: &str = "qemu64,+rdrand,+arat";

/// Machine, CPU, memory and the flags every capsem VM shares — also the probe's and the boot
/// benchmark's baseline, so they all boot the same virtual machine.
pub fn machine_args(accel: Accel, ram_mb: u32, cpus: u32) -> Vec<String> {
    let cpu = match accel {
        Accel::Kvm => "host",
        // RDRAND lets the guest kernel seed its RNG at boot (it trusts the CPU); without it the
        // first getrandom() in the guest waits about a second under TCG. ARAT (the local APIC
        // timer keeps running when idle, as QEMU's emulated one does) lets the guest kernel
        // use one-shot timers: without it the guest ticks 250 times a second per vCPU even
        // when idle, and every tick wakes QEMU on the host.
        Accel::Tcg => TCG_CPU,
    };
    [
        "-M",
        &format!("microvm,accel={},x-option-roms=off", accel.as_str()),
        "-cpu",
        cpu,
        "-m",
        &format!("{ram_mb}M"),
        "-smp",
        &cpus.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Whether the guest's CPU (as [`machine_args`] sets it) has AES instructions: under KVM it is
/// the host's CPU; TCG's `qemu64` has none.
pub fn guest_has_aes(accel: Accel) -> bool {
    match accel {
        #[cfg(target_arch = "x86_64")]
        Accel::Kvm => std::arch::is_x86_feature_detected!("aes"),
        #[cfg(not(target_arch = "x86_64"))]
        Accel::Kvm => false,
        // `qemu64` has none of its own; only an explicit `+aes` would add it.
        Accel::Tcg => TCG_CPU.split(',').any(|f| f == "+aes"),
    }
}

/// The guest kernel command line: console, `tsc_early_khz` under TCG (see the module doc), and
/// `extra` (`capsem.*` keys for the agent).
pub fn kernel_cmdline(accel: Accel, extra: &[String]) -> String {
    let mut c: Vec<String> = ["console=ttyS0", "quiet", "panic=-1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if accel == Accel::Tcg {
        if let Some(khz) = host_tsc_khz() {
            c.push(format!("tsc_early_khz={khz}"));
        }
        // With several vCPUs the kernel finds TCG's TSCs "unsynchronized" and falls back to
        // jiffies: a 4 ms clock for every timestamp and timer in the guest. TCG derives every
        // vCPU's TSC from the same host clock, so it is reliable.
        c.push("tsc=reliable".to_string());
        // Emulated CPU time is dear: skip the boot-time self-tests of every crypto algorithm
        // (a quarter of a second) and the zeroing of every kernel allocation (Debian's
        // init_on_alloc hardening; a fifth of a second of boot and part of every fork). Both
        // guard the guest kernel against itself, not the host against the guest.
        c.push("cryptomgr.notests".to_string());
        c.push("init_on_alloc=0".to_string());
        // No address-space randomisation in the guest: TCG (QEMU 7.2) keys its translated code
        // by virtual address, so with randomised mappings every new process translates libc
        // and ld.so afresh. fork+exec of /bin/true drops from 29 ms to 7 ms, Python's start
        // from 220 ms to 110 ms. ASLR guards guest processes from each other; the boundary
        // capsem enforces is QEMU's, which this does not touch.
        c.push("norandmaps".to_string());
    }
    c.extend(extra.iter().cloned());
    c.join(" ")
}

/// The command that boots `kernel` + `initrd` in probe mode: `/init` prints [`PROBE_MARKER`] on
/// the serial console (stdout) and powers off.
pub fn probe_command(
    qemu: &Path,
    kernel: &Path,
    initrd: &Path,
    accel: Accel,
    ram_mb: u32,
    cpus: u32,
) -> std::process::Command {
    let mut cmd = std::process::Command::new(qemu);
    cmd.args(machine_args(accel, ram_mb, cpus))
        .args(["-serial", "stdio", "-kernel"])
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(kernel_cmdline(accel, &["capsem.probe=1".to_string()]))
        .stdin(Stdio::null());
    cmd
}

/// Ask the kernel to SIGKILL the child when the thread that spawned it exits, so a killed
/// capsem-process never leaves a QEMU behind. Spawn from a long-lived thread.
pub fn die_with_parent(cmd: &mut tokio::process::Command) {
    // SAFETY: prctl is async-signal-safe and touches only the child's own state.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The QEMU binary, as an absolute path: QEMU is started in the VM's directory, where a
/// relative one would not be found.
pub fn qemu_binary() -> Result<PathBuf, HypervisorError> {
    match std::env::var_os(QEMU_ENV).filter(|v| !v.is_empty()) {
        Some(p) => {
            let p = PathBuf::from(p);
            if p.is_file() {
                std::path::absolute(&p)
                    .map_err(|_| HypervisorError::QemuMissing(p.display().to_string()))
            } else {
                Err(HypervisorError::QemuMissing(p.display().to_string()))
            }
        }
        None => find_program("qemu-system-x86_64")
            .ok_or_else(|| HypervisorError::QemuMissing("qemu-system-x86_64 on PATH".into())),
    }
}

/// First executable called `name` on PATH, as an absolute path (a PATH entry may be relative).
pub fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
        .and_then(|p| std::path::absolute(p).ok())
}

/// The host TSC frequency in kHz, from `/proc/cpuinfo`'s "cpu MHz".
pub fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    parse_cpu_mhz(&info)
}

fn parse_cpu_mhz(cpuinfo: &str) -> Option<u64> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|mhz| (mhz * 1000.0) as u64)
}

/// Boot `kernel` + `initrd` in probe mode with `accel` and report whether the probe line arrived
/// within `limit`. Also the baseline of the boot benchmark (bare boot to `/init` and power off).
pub async fn probe(
    qemu: &Path,
    kernel: &Path,
    initrd: &Path,
    accel: Accel,
    limit: Duration,
) -> std::io::Result<bool> {
    let mut cmd: tokio::process::Command =
        probe_command(qemu, kernel, initrd, accel, 256, 1).into();
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let mut out = child.stdout.take().expect("piped");
    let found = tokio::time::timeout(limit, async {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = out.read(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            seen.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&seen).contains(PROBE_MARKER) {
                return Ok(true);
            }
        }
    })
    .await;
    let ok = matches!(found, Ok(Ok(true)));
    if ok {
        // The guest powers off right after the marker; give it a moment to exit cleanly.
        let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
    }
    let _ = child.kill().await;
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_mhz() {
        let s = "processor\t: 0\ncpu MHz\t\t: 2596.146\n";
        assert_eq!(parse_cpu_mhz(s), Some(2_596_146));
        assert_eq!(parse_cpu_mhz("nothing"), None);
    }

    #[test]
    fn args_carry_the_contract() {
        let q = Qemu {
            binary: "qemu".into(),
            img: "qemu-img".into(),
            accel: Accel::Tcg,
        };
        let spec = VmSpec {
            kernel: "/a/vmlinuz".into(),
            initrd: "/a/initrd.img".into(),
            rootfs: "/a/rootfs.squashfs".into(),
            disk: "/s/disk.qcow2".into(),
            ram_mb: 2048,
            cpus: 2,
            socket_dir: "/s".into(),
            incoming: None,
            serial_log: "/s/serial.log".into(),
            hostname: "box".into(),
            cmdline_extra: vec![],
        };
        let a = q.args(&spec).join(" ");
        for want in [
            "microvm,accel=tcg",
            "-m 2048M",
            "-smp 2",
            "serial=capsem-rootfs",
            "serial=capsem-disk",
            "readonly=on",
            "name=capsem.0",
            "capsem.hostname=box",
            "-no-reboot",
            // Sockets are named relative to `socket_dir`, whatever its depth.
            "socket,id=channel0,path=channel.sock,",
            "unix:qmp.sock,server=on",
        ] {
            assert!(a.contains(want), "missing {want} in {a}");
        }
    }
}
