//! Keeping an in-memory snapshot of configuration tables current on every instance: reloaded
//! when its tables notify a change, when the notification connection comes back (a change may
//! have been missed meanwhile), on request, and every `refresh` in any case.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::error::Result;

/// A snapshot kept current in the background.
#[derive(Debug)]
pub struct Live<T> {
    current: watch::Receiver<Arc<T>>,
    reload: Arc<Notify>,
}

impl<T> Clone for Live<T> {
    fn clone(&self) -> Self {
        Self {
            current: self.current.clone(),
            reload: self.reload.clone(),
        }
    }
}

impl<T: Send + Sync + 'static> Live<T> {
    /// Loads the snapshot once, then keeps it current until `shutdown`. `what` names it in
    /// logs; `channel` is the NOTIFY channel of its tables; `same` tells whether a reload
    /// changed anything.
    pub(crate) async fn start<L, Fut>(
        pool: PgPool,
        refresh: Duration,
        channel: &'static str,
        what: &'static str,
        load: L,
        same: fn(&T, &T) -> bool,
        shutdown: CancellationToken,
    ) -> Result<Self>
    where
        L: Fn(PgPool) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        let initial = load(pool.clone()).await?;
        let (tx, rx) = watch::channel(Arc::new(initial));
        let reload = Arc::new(Notify::new());
        let keeper = Keeper {
            pool,
            refresh,
            channel,
            what,
            tx,
            reload: reload.clone(),
            same,
        };
        tokio::spawn(keeper.run(load, shutdown));
        Ok(Self {
            current: rx,
            reload,
        })
    }

    /// A snapshot that never changes, kept by nothing: for a part run without its tables
    /// (its own tests).
    pub fn fixed(value: T) -> Self {
        let (_, current) = watch::channel(Arc::new(value));
        Self {
            current,
            reload: Arc::new(Notify::new()),
        }
    }

    pub fn current(&self) -> Arc<T> {
        self.current.borrow().clone()
    }

    /// Asks for a reload now (after this instance changed something).
    pub fn reload_now(&self) {
        self.reload.notify_one();
    }

    /// Waits until the snapshot changes.
    pub async fn changed(&mut self) -> bool {
        self.current.changed().await.is_ok()
    }
}

struct Keeper<T> {
    pool: PgPool,
    refresh: Duration,
    channel: &'static str,
    what: &'static str,
    tx: watch::Sender<Arc<T>>,
    reload: Arc<Notify>,
    same: fn(&T, &T) -> bool,
}

impl<T: Send + Sync + 'static> Keeper<T> {
    async fn run<L, Fut>(self, load: L, shutdown: CancellationToken)
    where
        L: Fn(PgPool) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let what = self.what;
        let mut listener: Option<PgListener> = None;
        let mut ticker = tokio::time::interval(self.refresh);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if listener.is_none() {
                listener = match self.listen().await {
                    Ok(l) => Some(l),
                    Err(e) => {
                        tracing::warn!(error = %e, what, "cannot listen for changes; reloading periodically");
                        None
                    }
                };
            }
            let woke = tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => "timer",
                () = self.reload.notified() => "request",
                n = async {
                    match listener.as_mut() {
                        Some(l) => l.try_recv().await,
                        None => std::future::pending().await,
                    }
                } => match n {
                    Ok(Some(_)) => "notification",
                    // The connection was lost and will be re-established: changes may have
                    // been missed while it was down, so reload.
                    Ok(None) => "reconnect",
                    Err(e) => {
                        tracing::warn!(error = %e, what, "change listener failed");
                        listener = None;
                        "listener error"
                    }
                },
            };
            match load(self.pool.clone()).await {
                Ok(next) => {
                    if !(self.same)(&self.tx.borrow(), &next) {
                        if woke == "timer" {
                            tracing::debug!(what, trigger = woke, "reloaded");
                        } else {
                            tracing::info!(what, trigger = woke, "reloaded");
                        }
                        self.tx.send_replace(Arc::new(next));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, what, trigger = woke, "cannot reload; keeping the current one")
                }
            }
        }
    }

    async fn listen(&self) -> Result<PgListener> {
        let mut l = PgListener::connect_with(&self.pool).await?;
        l.listen(self.channel).await?;
        Ok(l)
    }
}
