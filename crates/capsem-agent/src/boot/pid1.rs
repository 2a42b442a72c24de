//! PID 1's split: fork before any thread exists; the parent stays PID 1 and reaps every orphan,
//! and powers the VM off when the agent child exits; the child returns and becomes the agent.

use crate::{console, power};

/// Fork. Returns in the child only.
pub fn fork_reaper() {
    // SAFETY: called from the single-threaded PID 1 before any runtime or thread exists.
    match unsafe { libc::fork() } {
        0 => {}
        pid if pid > 0 => reap_forever(pid),
        _ => {
            console::line(&format!(
                "boot failed: fork: {}",
                std::io::Error::last_os_error()
            ));
            power::power_off();
        }
    }
}

fn reap_forever(agent: libc::pid_t) -> ! {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status int we own.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == agent {
            let how = if libc::WIFEXITED(status) {
                format!("exit code {}", libc::WEXITSTATUS(status))
            } else {
                format!("signal {}", libc::WTERMSIG(status))
            };
            console::line(&format!("agent exited ({how}); powering off"));
            power::power_off();
        }
        if pid < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
            console::line("no agent process left; powering off");
            power::power_off();
        }
    }
}
