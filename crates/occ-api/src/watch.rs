//! Watch streams: a snapshot of the open incidents, then every change as it commits.

use std::time::Duration;

use occ_domain::QueueName;
use occ_proto::v1 as pb;
use occ_store::PgPool;
use occ_store::changes::{self, Feed};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::convert;
use crate::error::ApiResult;

/// The most open incidents a snapshot carries.
const SNAPSHOT_LIMIT: i64 = 10_000;
/// Messages buffered for one client.
const BUFFER: usize = 256;
/// How long a client may leave its buffer full before it is cut off.
const STALL: Duration = Duration::from_secs(10);

pub type WatchStream<T> = ReceiverStream<Result<T, Status>>;

/// Starts a watch of one queue or all. `wrap` makes the RPC's response message.
pub async fn watch<T, F>(
    pool: &PgPool,
    feed: &Feed,
    queue: Option<QueueName>,
    wrap: F,
) -> ApiResult<WatchStream<T>>
where
    T: Send + 'static,
    F: Fn(pb::IncidentChange) -> T + Send + Sync + 'static,
{
    // Subscribe before the snapshot: a change committed in between is then both in the feed
    // and above the snapshot's sequence number, never in neither.
    let stopping = feed.stopping();
    let mut feed = feed.subscribe();
    let (seq, open) =
        changes::snapshot(pool, queue.as_ref().map(|q| q.as_str()), SNAPSHOT_LIMIT).await?;
    let (tx, rx) = mpsc::channel(BUFFER);
    tokio::spawn(async move {
        let send = |m: pb::IncidentChange| {
            let tx = tx.clone();
            let item = wrap(m);
            async move {
                match tx.send_timeout(Ok(item), STALL).await {
                    Ok(()) => true,
                    Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                        let _ = tx.try_send(Err(Status::resource_exhausted(
                            "the client did not keep up with the stream; watch again",
                        )));
                        false
                    }
                    Err(mpsc::error::SendTimeoutError::Closed(_)) => false,
                }
            }
        };
        for incident in &open {
            let snapshot = pb::IncidentChange {
                kind: pb::ChangeKind::Snapshot as i32,
                incident: Some(convert::incident(incident)),
                time: Some(convert::timestamp(incident.updated_at)),
                ..Default::default()
            };
            if !send(snapshot).await {
                return;
            }
        }
        let complete = pb::IncidentChange {
            sequence: seq,
            kind: pb::ChangeKind::SnapshotComplete as i32,
            ..Default::default()
        };
        if !send(complete).await {
            return;
        }
        loop {
            let next = tokio::select! {
                () = tx.closed() => return,
                () = stopping.cancelled() => Err(broadcast::error::RecvError::Closed),
                next = feed.recv() => next,
            };
            match next {
                Ok(change) => {
                    if change.seq <= seq {
                        continue;
                    }
                    if queue
                        .as_ref()
                        .is_some_and(|q| !change.queues.iter().any(|c| c == q.as_str()))
                    {
                        continue;
                    }
                    if !send(convert::change(&change)).await {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let _ = tx.try_send(Err(Status::resource_exhausted(format!(
                        "the stream fell {n} changes behind; watch again"
                    ))));
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => {
                    let _ = tx.try_send(Err(Status::unavailable(
                        "OCC is shutting down; watch again",
                    )));
                    return;
                }
            }
        }
    });
    Ok(ReceiverStream::new(rx))
}
