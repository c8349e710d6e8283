//! OCC's producer formats. Each adapter is a pure function from one MQTT message (topic and
//! bytes) to the events it carries, or to a [`Rejection`] that names the field at fault; no
//! I/O, so the same decoding serves live ingest and the replay of dead letters.
//!
//! | adapter | topics (configurable) | producer |
//! |---|---|---|
//! | [`native`] | `occ/v1/events/{source_id}`, `occ/v1/status/{source_id}` | OCC's envelope |
//! | [`frigate`] | `frigate/events`, `frigate/reviews`, `frigate/tracked_object_update`, camera status, `frigate/available` | Frigate NVR 0.14–0.17 |
//! | [`chirpstack`] | `application/{application_id}/device/{dev_eui}/event/{event}` | ChirpStack v4, JSON |
//! | [`senml`] | `occ/v1/senml/{source_id}` | SenML JSON (RFC 8428, RFC 9100) |
//!
//! Adding a producer means one module here and one line in [`build`].
#![forbid(unsafe_code)]

pub mod adapter;
pub mod chirpstack;
pub mod frigate;
pub mod native;
pub mod senml;
pub mod status;
#[cfg(test)]
mod testing;

pub use adapter::{
    Adapter, Adapters, Message, Rejection, TemplateError, TopicTemplate, topic_matches,
};
pub use chirpstack::{ChirpstackAdapter, ChirpstackConfig};
pub use frigate::{FrigateAdapter, FrigateConfig};
pub use native::{NativeAdapter, NativeConfig};
pub use senml::{SenmlAdapter, SenmlConfig};

/// Which adapters run, and how each is configured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdaptersConfig {
    pub native: Option<NativeConfig>,
    /// One per NVR.
    pub frigate: Vec<FrigateConfig>,
    pub chirpstack: Option<ChirpstackConfig>,
    pub senml: Option<SenmlConfig>,
}

/// The adapters `config` asks for, in routing order.
pub fn build(config: &AdaptersConfig) -> Result<Adapters, TemplateError> {
    let mut adapters: Vec<Box<dyn Adapter>> = Vec::new();
    if let Some(c) = &config.native {
        adapters.push(Box::new(NativeAdapter::new(c)?));
    }
    for c in &config.frigate {
        adapters.push(Box::new(FrigateAdapter::new(c)?));
    }
    if let Some(c) = &config.chirpstack {
        adapters.push(Box::new(ChirpstackAdapter::new(c)?));
    }
    if let Some(c) = &config.senml {
        adapters.push(Box::new(SenmlAdapter::new(c)?));
    }
    Ok(Adapters::new(adapters))
}
