//! `capsem shell` in a real terminal (tmux): typing, resize, Ctrl-C, and exit destroying the
//! temporary session.

use std::process::Command;
use std::time::Duration;

use capsem_e2e::Env;

struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "t"])
    }
    fn wait_for(&self, env: &Env, text: &str, secs: u64) -> bool {
        env.wait_until(Duration::from_secs(secs), || self.screen().contains(text))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .arg("kill-server")
            .output();
    }
}

#[test]
fn temp_shell_in_a_real_terminal() {
    let Some(env) = Env::new() else { return };
    assert!(
        capsem_e2e::which("tmux").is_some(),
        "tmux is required for this test"
    );
    let tmux = Tmux {
        socket: format!("capsem-e2e-{}", std::process::id()),
    };
    let cmd = format!(
        "env CAPSEM_HOME={} {} shell; echo CLI-EXITED-$?; sleep 30",
        env.path().display(),
        env.bin.join("capsem").display()
    );
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "t",
        "-x",
        "100",
        "-y",
        "30",
        &cmd,
    ]);
    assert!(tmux.wait_for(&env, "#", 90), "no prompt: {}", tmux.screen());
    assert_eq!(
        env.ids().len(),
        1,
        "a temporary session exists while the shell runs"
    );

    tmux.run(&["send-keys", "-t", "t", "echo $((6*7))", "Enter"]);
    assert!(tmux.wait_for(&env, "\n42", 10), "{}", tmux.screen());

    tmux.run(&["resize-window", "-t", "t", "-x", "120", "-y", "40"]);
    std::thread::sleep(Duration::from_millis(500));
    tmux.run(&["send-keys", "-t", "t", "stty size", "Enter"]);
    assert!(tmux.wait_for(&env, "40 120", 10), "{}", tmux.screen());

    // Ctrl-C interrupts the guest command, not the CLI.
    tmux.run(&[
        "send-keys",
        "-t",
        "t",
        "sleep 1000; echo after-$((2+3))",
        "Enter",
    ]);
    std::thread::sleep(Duration::from_millis(800));
    tmux.run(&["send-keys", "-t", "t", "C-c"]);
    tmux.run(&["send-keys", "-t", "t", "echo still-$((1+1))", "Enter"]);
    assert!(tmux.wait_for(&env, "still-2", 10), "{}", tmux.screen());
    assert!(
        !tmux.screen().contains("after-5"),
        "the rest of the line ran: {}",
        tmux.screen()
    );
    assert!(!tmux.screen().contains("CLI-EXITED"));

    tmux.run(&["send-keys", "-t", "t", "exit", "Enter"]);
    assert!(tmux.wait_for(&env, "CLI-EXITED-0", 10), "{}", tmux.screen());
    assert!(
        env.wait_until(Duration::from_secs(10), || env.ids().is_empty()
            && env.processes("qemu-system").is_empty()),
        "the temporary session outlived its shell"
    );
}
