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
