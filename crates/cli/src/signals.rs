//! How the long-running commands (`hub`, `node`, `demo`, and any later one such as `synth`) are
//! asked to stop: the first Ctrl-C or SIGTERM starts a stop bounded by the command's own drain
//! timeout; a second one stops at once (exit status 130).

use std::future::Future;

/// SIGINT and SIGTERM as one stream of signal names.
pub struct Signals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers (from then on these signals no longer kill the process). Call it
    /// inside a runtime.
    pub fn install() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                int: signal(SignalKind::interrupt())?,
                term: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// The next signal's name.
    pub async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.int.recv() => "SIGINT",
                _ = self.term.recv() => "SIGTERM",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }
}

/// For a command that stops by a future: resolves on the first signal; a second signal exits
/// at once with status 130. The handlers are installed before this returns, so a signal that
/// comes while the command is still starting (a node loading its model) is not lost. Call it
/// inside the runtime.
pub fn stop_signal() -> impl Future<Output = ()> {
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
    match Signals::install() {
        Ok(mut signals) => {
            tokio::spawn(async move {
                let name = signals.next().await;
                tracing::info!(
                    signal = name,
                    "stopping; a second Ctrl-C or SIGTERM stops at once"
                );
                let _ = first_tx.send(());
                let name = signals.next().await;
                tracing::warn!(
                    signal = name,
                    "second signal: stopping at once, without draining"
                );
                std::process::exit(130);
            });
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for signals; only SIGKILL stops this process")
        }
    }
    async move {
        if first_rx.await.is_err() {
            // No handler: nothing will ever ask to stop.
            std::future::pending::<()>().await
        }
    }
}

/// Runs a service (`hub`, `node`) until it returns, then drops the runtime without waiting for
/// blocking work left behind (a model still loading, a generation cut off by the drain timeout).
pub fn run_service(f: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(f);
    runtime.shutdown_background();
    result
}

/// What to do once the first signal's action has returned.
pub enum AfterFirst {
    /// Exit with status 130.
    Exit,
    /// Keep running; a second signal still runs the second action and exits.
    Continue,
}

/// Runs `first` (on a blocking thread) at the first SIGINT or SIGTERM; a second signal, even
/// while `first` runs, runs `second` and exits with status 130. Returns once the handlers are
/// installed, from a thread of its own, so it works from synchronous commands too.
pub fn on_signals(
    first: impl FnOnce(&'static str) -> AfterFirst + Send + 'static,
    second: impl FnOnce(&'static str) + Send + 'static,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        runtime.block_on(async move {
            let mut signals = match Signals::install() {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            let name = signals.next().await;
            let mut running = tokio::task::spawn_blocking(move || first(name));
            let after = tokio::select! {
                after = &mut running => after.unwrap_or(AfterFirst::Exit),
                name = signals.next() => {
                    second(name);
                    std::process::exit(130);
                }
            };
            if let AfterFirst::Continue = after {
                second(signals.next().await);
            }
            std::process::exit(130);
        });
    });
    ready_rx
        .recv()
        .context("the signal thread ended")?
        .context("installing the signal handlers")
}
