//! The simulated services of the `simulators` crate, each on a tokio runtime of its own (its own
//! threads, as a separate server would have), so that the clients measured do not share a
//! scheduler with them.

use anyhow::Context as _;
use microsoft_simulators::identity::{AppRegistration, IdentityPlatform};
use microsoft_simulators::smtp::{SmtpConfig, SmtpServer, TlsMode};
use std::future::Future;
use std::sync::Arc;

/// A tokio runtime on threads of its own, stopped when dropped.
pub struct Background {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    /// Starts a runtime with `threads` worker threads named `name`.
    pub fn start(name: &str, threads: usize) -> anyhow::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread_name = name.to_string();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(threads.max(1))
                    .thread_name(thread_name)
                    .enable_all()
                    .build();
                match runtime {
                    Ok(runtime) => {
                        let _ = tx.send(Ok(runtime.handle().clone()));
                        runtime.block_on(async {
                            let _ = stopped.await;
                        });
                        runtime.shutdown_timeout(std::time::Duration::from_secs(2));
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })?;
        let handle = rx.recv().context("the runtime thread died")??;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Runs `future` on this runtime and waits for it.
    pub async fn run<F, T>(&self, future: F) -> anyhow::Result<T>
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        self.handle
            .spawn(future)
            .await
            .map_err(|e| anyhow::anyhow!("a background task failed: {e}"))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The fast SMTP sink: the `simulators` crate's simulated Exchange server in plain text,
/// accepting any XOAUTH2 (no validator) or no AUTH at all, keeping no bodies.
pub struct Sink {
    server: Arc<SmtpServer>,
    runtime: Background,
}

impl Sink {
    /// Starts the sink on a loopback port with a runtime of `threads` threads.
    pub async fn start(threads: usize) -> anyhow::Result<Self> {
        let runtime = Background::start("smtp-sink", threads)?;
        let server = runtime
            .run(SmtpServer::start(SmtpConfig {
                tls: TlsMode::Plain,
                validator: None,
                require_auth: false,
                record_bodies: false,
                ..SmtpConfig::default()
            }))
            .await??;
        Ok(Self {
            server: Arc::new(server),
            runtime,
        })
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.server.port()
    }

    /// How many messages it accepted so far.
    pub fn received(&self) -> usize {
        self.server.received_count()
    }

    /// How many copies of each Message-ID it accepted so far.
    pub fn copies(&self) -> std::collections::HashMap<String, usize> {
        self.server.count_by_message_id()
    }

    /// Extra copies accepted since `before` (a [`Sink::copies`]): a Message-ID accepted more
    /// than once since then counts once for each extra copy.
    pub fn duplicates_since(&self, before: &std::collections::HashMap<String, usize>) -> usize {
        self.server
            .count_by_message_id()
            .iter()
            .map(|(id, n)| {
                n.saturating_sub(before.get(id).copied().unwrap_or(0))
                    .saturating_sub(1)
            })
            .sum()
    }

    /// Waits until it accepted `count` messages in all (at most `limit`).
    pub async fn wait_for(&self, count: usize, limit: std::time::Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        while self.received() < count {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the sink received {} of {count} messages in {limit:?}",
                self.received()
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Stops it.
    pub async fn stop(self) {
        let server = self.server.clone();
        let _ = self.runtime.run(async move { server.stop().await }).await;
    }
}

/// The simulated identity platform on a runtime of its own, with one application registered.
pub struct Idp {
    /// The platform.
    pub platform: IdentityPlatform,
    runtime: Background,
}

impl Idp {
    /// Starts it and registers `client_id` / `client_secret` with `redirect_uri`.
    pub async fn start(
        client_id: &str,
        client_secret: &str,
        redirect_uri: &str,
    ) -> anyhow::Result<Self> {
        let runtime = Background::start("identity", 1)?;
        let platform = runtime.run(IdentityPlatform::start()).await??;
        platform.register_app(AppRegistration {
            client_id: client_id.to_string(),
            client_secret: client_secret.to_string(),
            secret_expired: false,
            redirect_uris: vec![redirect_uri.to_string()],
        });
        Ok(Self { platform, runtime })
    }

    /// Stops it.
    pub async fn stop(self) {
        let platform = self.platform.clone();
        let _ = self.runtime.run(async move { platform.stop().await }).await;
    }
}
