//! OCC's own tools as clients of its API (the simulator, its dispatch room): a channel that
//! sends an API key with every call.

use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A connection to the API that authenticates every call.
pub type Api = InterceptedService<Channel, Credentials>;

/// The key a client sends (none when OCC runs without authentication).
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    bearer: Option<MetadataValue<Ascii>>,
}

impl Credentials {
    pub fn key(key: Option<&str>) -> anyhow::Result<Self> {
        let bearer = key
            .map(|k| {
                format!("Bearer {}", k.trim())
                    .parse()
                    .context("an API key is ASCII text")
            })
            .transpose()?;
        Ok(Self { bearer })
    }
}

impl Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(bearer) = &self.bearer {
            request
                .metadata_mut()
                .insert("authorization", bearer.clone());
        }
        Ok(request)
    }
}

/// Connects to the API at `endpoint`, waiting until it answers.
pub async fn connect(endpoint: &str, shutdown: &CancellationToken) -> anyhow::Result<Channel> {
    let endpoint = Channel::from_shared(endpoint.to_owned())
        .with_context(|| format!("{endpoint:?} is not a URL"))?;
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(e) => {
                tracing::debug!(error = %e, "waiting for the OCC API");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = shutdown.cancelled() => anyhow::bail!("stopped before the API answered"),
                }
            }
        }
    }
}

/// The same channel with other credentials.
pub fn with_key(channel: Channel, key: Option<&str>) -> anyhow::Result<Api> {
    Ok(InterceptedService::new(channel, Credentials::key(key)?))
}
