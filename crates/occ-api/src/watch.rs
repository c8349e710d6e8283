//! Watch streams: a snapshot of the open incidents, then every change as it commits.
//!
//! Each stream has a bounded buffer. A client that leaves it full for too long, or falls so
//! far behind that the instance's feed drops changes for it, is cut off with
//! RESOURCE_EXHAUSTED (it should watch again and get a fresh snapshot); other clients are not
//! slowed. The final status always reaches the client after the buffered messages.

use std::pin::Pin;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use occ_proto::v1 as pb;
use occ_store::PgPool;
use occ_store::changes;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use occ_domain::IncidentId;

use crate::convert;
use crate::error::ApiError;

/// The most open incidents a snapshot carries; past it, the snapshot says it is truncated.
const SNAPSHOT_LIMIT: i64 = 10_000;
/// Messages buffered for one client.
const BUFFER: usize = 256;
/// How long a client may leave its buffer full before it is cut off.
const STALL: Duration = Duration::from_secs(10);
/// How often the incidents a stream delivered are put on the record of reads.
const RECORD_EVERY: Duration = Duration::from_secs(5);

/// Who watches, for the record of reads (see [`occ_store::reads`]).
#[derive(Debug, Clone)]
struct Reader {
    pool: PgPool,
    clock: occ_domain::SharedClock,
    principal: String,
    method: &'static str,
    /// The agencies whose incidents' reads are recorded.
    agencies: std::sync::Arc<Vec<String>>,
}

/// The incidents a stream has delivered and not yet recorded.
struct ReadLog {
    reader: Option<Reader>,
    pending: std::collections::HashSet<IncidentId>,
}

impl ReadLog {
    fn new(reader: Reader) -> Self {
        // Nothing to record when no agency's reads are.
        let reader = Some(reader).filter(|r| !r.agencies.is_empty());
        Self {
            reader,
            pending: std::collections::HashSet::new(),
        }
    }

    fn saw(&mut self, incident: IncidentId) {
        if self.reader.is_some() {
            self.pending.insert(incident);
        }
    }

    /// Records what was delivered since the last time; false if it could not be recorded.
    async fn flush(&mut self) -> bool {
        let Some(reader) = &self.reader else {
            return true;
        };
        if self.pending.is_empty() {
            return true;
        }
        let ids: Vec<IncidentId> = self.pending.drain().collect();
        let recorded = async {
            let mut conn = occ_store::acquire(&reader.pool).await?;
            occ_store::reads::record(
                &mut conn,
                reader.clock.now(),
                &reader.principal,
                reader.method,
                &ids,
                &reader.agencies,
            )
            .await
        };
        match recorded.await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, principal = %reader.principal, "cannot record a watch stream's reads; ending it");
                false
            }
        }
    }
}

pub type WatchStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Where a watch task sends: data into the buffer, the final status after it.
struct Sink<T> {
    data: mpsc::Sender<Result<T, Status>>,
    end: Option<oneshot::Sender<Status>>,
}

impl<T> Sink<T> {
    /// False when the stream is over (client gone or cut off).
    async fn send(&mut self, item: T) -> bool {
        match self.data.send_timeout(Ok(item), STALL).await {
            Ok(()) => true,
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                self.finish(Status::resource_exhausted(
                    "the client did not keep up with the stream; watch again",
                ));
                false
            }
            Err(mpsc::error::SendTimeoutError::Closed(_)) => false,
        }
    }

    fn finish(&mut self, status: Status) {
        if let Some(end) = self.end.take() {
            let _ = end.send(status);
        }
    }
}

/// Starts a watch of some queues (`None` for all). `wrap` makes the RPC's response message.
///
/// `who` holds one of its places among its streams while the stream lasts. What the stream
/// shows is on the record of reads (as `method`): the snapshot before it
/// is sent, then the incidents changes showed every [`RECORD_EVERY`] and when the stream
/// ends. A stream whose reads cannot be recorded ends (UNAVAILABLE).
///
/// A change shows when it touches a watched queue: a transfer out of them is the last change
/// the watcher sees of that incident (it says where the incident went), a transfer into them
/// the first.
pub async fn watch<T, F>(
    state: &crate::ApiState,
    who: &crate::principal::Principal,
    queues: Option<Vec<String>>,
    method: &'static str,
    wrap: F,
) -> Result<WatchStream<T>, Status>
where
    T: Send + 'static,
    F: Fn(pb::IncidentChange) -> T + Send + Sync + 'static,
{
    let permit = state.auth.stream_permit(who)?;
    let (pool, feed) = (&state.pool, &state.feed);
    // Subscribe before the snapshot: a change committed in between is then in the feed, or in
    // the snapshot, or both, never in neither; the stream skips what its snapshot shows.
    let stopping = feed.stopping();
    let mut feed = feed.subscribe();
    let (seen, open) = changes::snapshot(pool, queues.as_deref(), SNAPSHOT_LIMIT + 1)
        .await
        .map_err(ApiError::from)?;
    let (data_tx, data_rx) = mpsc::channel(BUFFER);
    let (end_tx, end_rx) = oneshot::channel::<Status>();
    let mut sink = Sink {
        data: data_tx,
        end: Some(end_tx),
    };
    let mut reads = ReadLog::new(Reader {
        pool: state.pool.clone(),
        clock: state.clock.clone(),
        principal: who.subject.clone(),
        method,
        agencies: state.recorded_agencies.clone(),
    });
    tokio::spawn(async move {
        let truncated = open.len() as i64 > SNAPSHOT_LIMIT;
        for incident in open.iter().take(SNAPSHOT_LIMIT as usize) {
            reads.saw(incident.id);
        }
        if !reads.flush().await {
            sink.finish(Status::unavailable("cannot record this read; watch again"));
            return;
        }
        for incident in open.iter().take(SNAPSHOT_LIMIT as usize) {
            if stopping.is_cancelled() {
                sink.finish(Status::unavailable("OCC is shutting down; watch again"));
                return;
            }
            let snapshot = pb::IncidentChange {
                kind: pb::ChangeKind::Snapshot as i32,
                incident: Some(convert::incident(incident)),
                time: Some(convert::timestamp(incident.updated_at)),
                ..Default::default()
            };
            if !sink.send(wrap(snapshot)).await {
                return;
            }
        }
        let complete = pb::IncidentChange {
            kind: pb::ChangeKind::SnapshotComplete as i32,
            detail: if truncated {
                format!("truncated: the {SNAPSHOT_LIMIT} most urgent open incidents only")
            } else {
                String::new()
            },
            ..Default::default()
        };
        if !sink.send(wrap(complete)).await {
            return;
        }
        let mut record = tokio::time::interval(RECORD_EVERY);
        record.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = tokio::select! {
                () = sink.data.closed() => {
                    reads.flush().await;
                    return;
                }
                () = stopping.cancelled() => Err(broadcast::error::RecvError::Closed),
                _ = record.tick() => {
                    if !reads.flush().await {
                        sink.finish(Status::unavailable("cannot record this read; watch again"));
                        return;
                    }
                    continue;
                }
                next = feed.recv() => next,
            };
            match next {
                Ok(change) => {
                    if seen.sees(change.xid) {
                        continue;
                    }
                    if queues
                        .as_ref()
                        .is_some_and(|qs| !change.queues.iter().any(|c| qs.contains(c)))
                    {
                        continue;
                    }
                    reads.saw(change.incident.id);
                    if !sink.send(wrap(convert::change(&change))).await {
                        reads.flush().await;
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    reads.flush().await;
                    sink.finish(Status::resource_exhausted(format!(
                        "the stream fell {n} changes behind; watch again"
                    )));
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => {
                    reads.flush().await;
                    sink.finish(Status::unavailable("OCC is shutting down; watch again"));
                    return;
                }
            }
        }
    });
    // The buffered messages, then the final status if the watch task set one.
    let end = futures_util::stream::once(end_rx).filter_map(|r| async move { r.ok().map(Err) });
    // The caller's place among its streams is held as long as the stream is.
    Ok(Box::pin(ReceiverStream::new(data_rx).chain(end).map(
        move |message| {
            let _held = &permit;
            message
        },
    )))
}
