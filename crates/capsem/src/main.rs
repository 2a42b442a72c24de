//! `capsem`: the command line. Parses arguments (see [`cli`]), runs one command, prints errors as
//! one line (`capsem: what went wrong: why`) and exits with the command's code.

mod cli;
mod client;
mod commands;
mod progress;
mod stream;
mod term;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAPSEM_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match rt.block_on(commands::dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("capsem: {}", render(&e));
            1
        }
    };
    // Leave at once: a blocked stdin reader must not hold the exit.
    std::process::exit(code);
}

/// The error chain on one line, without repeating a cause already in the message.
pub(crate) fn render(e: &anyhow::Error) -> String {
    let mut s = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
    }
    s
}
