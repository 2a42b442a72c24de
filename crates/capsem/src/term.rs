//! The local terminal: raw mode (restored on drop) and window size.

use std::os::fd::BorrowedFd;

use nix::sys::termios::{self, SetArg, Termios};

/// Puts stdin in raw mode until dropped.
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    pub fn enable() -> nix::Result<Self> {
        let fd = stdin_fd();
        let saved = termios::tcgetattr(fd)?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(fd, SetArg::TCSANOW, &raw)?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(stdin_fd(), SetArg::TCSANOW, &self.saved);
    }
}

fn stdin_fd() -> BorrowedFd<'static> {
    // SAFETY: fd 0 stays open for the life of the process.
    unsafe { BorrowedFd::borrow_raw(0) }
}

pub fn is_tty(fd: i32) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// (cols, rows) of the terminal on stdout or stdin, or 80x24.
pub fn size() -> (u16, u16) {
    for fd in [1, 0, 2] {
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes a winsize into the struct we pass.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_col > 0 {
            return (ws.ws_col, ws.ws_row);
        }
    }
    (80, 24)
}

/// `text` made safe to print on a terminal: line ends kept (a console's `\r\n` becomes `\n`),
/// tabs kept, every other control character shown as `\xNN`, so that a guest cannot send the
/// user's terminal escape sequences (set its title, write its clipboard, move its cursor to
/// overwrite earlier lines).
pub fn inert(text: &str) -> std::borrow::Cow<'_, str> {
    let harmless = |c: char| c == '\n' || c == '\t' || !c.is_control();
    if text.chars().all(harmless) {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 16);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' if chars.peek() == Some(&'\n') => {}
            c if harmless(c) => out.push(c),
            c => out.push_str(&format!("\\x{:02x}", c as u32)),
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    #[test]
    fn escape_sequences_are_shown_not_sent() {
        assert_eq!(super::inert("plain\ttext\n"), "plain\ttext\n");
        assert_eq!(super::inert("boot\r\nok\r\n"), "boot\nok\n");
        assert_eq!(
            super::inert("\x1b]52;c;cHduZWQ=\x07x\rfake"),
            "\\x1b]52;c;cHduZWQ=\\x07x\\x0dfake"
        );
        assert_eq!(super::inert("\u{9b}31m"), "\\x9b31m");
    }
}
