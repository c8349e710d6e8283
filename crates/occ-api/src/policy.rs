//! Which roles may call which method: the one table the authorization layer reads.
//!
//! A method not in the table is refused to everyone (a new RPC is closed until it is given a
//! row). Health is public; reflection is as configured. Which incidents, queues and units a
//! permitted caller may touch is decided by the handlers, from its scope.

use occ_domain::access::{Principal, Role};

use crate::principal::Reflection;

/// Who may call a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, without credentials.
    Public,
    /// Callers holding any of these roles.
    Roles(&'static [Role]),
    /// Dispatchers and supervisors, and integrations granted status updates.
    StatusUpdate,
}

impl Access {
    pub fn allows(self, who: &Principal) -> bool {
        match self {
            Access::Public => true,
            Access::Roles(roles) => who.roles.any(roles),
            Access::StatusUpdate => {
                who.roles.any(WORK) || (who.has(Role::Integration) && who.may_update_status)
            }
        }
    }
}

use Role::{Admin, Dispatcher, Gateway, Integration, Investigator, Supervisor};

/// Read and watch incidents (an admin only sees those of queues it is granted).
const READ: &[Role] = &[Dispatcher, Supervisor, Integration, Admin, Investigator];
/// Search stored events (the kinds granted to the caller's agencies, for a named case).
const SEARCH: &[Role] = &[Investigator, Supervisor];
/// Work incidents and units.
const WORK: &[Role] = &[Dispatcher, Supervisor];
/// Every role but a gateway: reference data (queues, zones).
const STAFF: &[Role] = READ;
const ADMIN: &[Role] = &[Admin];
const SUPERVISOR: &[Role] = &[Supervisor];
/// The registry of sources: the city's IT and the supervisors who watch the devices.
const SOURCES: &[Role] = &[Supervisor, Admin];
/// Nobody.
const NOBODY: &[Role] = &[];

/// Every OCC method and who may call it.
pub const METHODS: &[(&str, Access)] = &[
    (
        "/occ.v1.IngestService/PublishEvents",
        Access::Roles(&[Gateway]),
    ),
    ("/occ.v1.IncidentService/GetIncident", Access::Roles(READ)),
    (
        "/occ.v1.IncidentService/GetIncidentCap",
        Access::Roles(READ),
    ),
    (
        "/occ.v1.IncidentService/GetIncidentEido",
        Access::Roles(READ),
    ),
    ("/occ.v1.IncidentService/ListIncidents", Access::Roles(READ)),
    ("/occ.v1.IncidentService/GetTimeline", Access::Roles(READ)),
    (
        "/occ.v1.IncidentService/WatchIncidents",
        Access::Roles(READ),
    ),
    (
        "/occ.v1.IncidentService/ExportIncident",
        Access::Roles(SEARCH),
    ),
    (
        "/occ.v1.IncidentService/UpdateIncidentStatus",
        Access::StatusUpdate,
    ),
    (
        "/occ.v1.IncidentService/AcknowledgeIncident",
        Access::Roles(SUPERVISOR),
    ),
    (
        "/occ.v1.IncidentService/AddNote",
        Access::Roles(&[Dispatcher, Supervisor, Integration]),
    ),
    ("/occ.v1.DispatchService/ListQueues", Access::Roles(STAFF)),
    ("/occ.v1.DispatchService/PutQueue", Access::Roles(ADMIN)),
    ("/occ.v1.DispatchService/ClaimNext", Access::Roles(WORK)),
    ("/occ.v1.DispatchService/ReleaseClaim", Access::Roles(WORK)),
    ("/occ.v1.DispatchService/ExtendClaim", Access::Roles(WORK)),
    ("/occ.v1.DispatchService/DispatchUnits", Access::Roles(WORK)),
    (
        "/occ.v1.DispatchService/TransferIncident",
        Access::Roles(SUPERVISOR),
    ),
    ("/occ.v1.DispatchService/WatchQueue", Access::Roles(READ)),
    ("/occ.v1.UnitService/UpsertUnit", Access::Roles(SUPERVISOR)),
    ("/occ.v1.UnitService/ListUnits", Access::Roles(WORK)),
    ("/occ.v1.UnitService/UpdateUnitStatus", Access::Roles(WORK)),
    (
        "/occ.v1.UnitService/ReportUnitLocation",
        Access::Roles(WORK),
    ),
    ("/occ.v1.UnitService/RecommendUnits", Access::Roles(WORK)),
    ("/occ.v1.RuleService/ListRules", Access::Roles(ADMIN)),
    ("/occ.v1.RuleService/PutRule", Access::Roles(ADMIN)),
    ("/occ.v1.RuleService/DeleteRule", Access::Roles(ADMIN)),
    ("/occ.v1.RuleService/TestRule", Access::Roles(ADMIN)),
    ("/occ.v1.SourceService/UpsertSource", Access::Roles(SOURCES)),
    (
        "/occ.v1.SourceService/ImportSources",
        Access::Roles(SOURCES),
    ),
    ("/occ.v1.SourceService/GetSource", Access::Roles(SOURCES)),
    ("/occ.v1.SourceService/ListSources", Access::Roles(SOURCES)),
    ("/occ.v1.SourceService/DeleteSource", Access::Roles(SOURCES)),
    ("/occ.v1.SourceService/PutProfile", Access::Roles(SOURCES)),
    ("/occ.v1.SourceService/ListProfiles", Access::Roles(SOURCES)),
    (
        "/occ.v1.SourceService/DeleteProfile",
        Access::Roles(SOURCES),
    ),
    // The wall: event counts for the whole room; incident counts within the caller's queues.
    ("/occ.v1.StatsService/CountEvents", Access::Roles(READ)),
    ("/occ.v1.StatsService/CountIncidents", Access::Roles(READ)),
    ("/occ.v1.ZoneService/PutZone", Access::Roles(ADMIN)),
    ("/occ.v1.ZoneService/ImportZones", Access::Roles(ADMIN)),
    ("/occ.v1.ZoneService/ListZones", Access::Roles(STAFF)),
    ("/occ.v1.ZoneService/DeleteZone", Access::Roles(ADMIN)),
    ("/occ.v1.ZoneService/LocateZone", Access::Roles(STAFF)),
    // Watch lists are the police's: plates wanted and where they were seen.
    (
        "/occ.v1.WatchlistService/AddWatchlistEntries",
        Access::Roles(SUPERVISOR),
    ),
    (
        "/occ.v1.WatchlistService/RemoveWatchlistEntry",
        Access::Roles(SUPERVISOR),
    ),
    (
        "/occ.v1.WatchlistService/ListWatchlistEntries",
        Access::Roles(SUPERVISOR),
    ),
    (
        "/occ.v1.WatchlistService/ListWatchlistHits",
        Access::Roles(SUPERVISOR),
    ),
    (
        "/occ.v1.DeadLetterService/ListDeadLetters",
        Access::Roles(SUPERVISOR),
    ),
    (
        "/occ.v1.DeadLetterService/ReplayDeadLetters",
        Access::Roles(SUPERVISOR),
    ),
    ("/occ.v1.EventService/SearchEvents", Access::Roles(SEARCH)),
    ("/occ.v1.EventService/GetEvent", Access::Roles(SEARCH)),
    ("/occ.v1.EventService/PlateHistory", Access::Roles(SEARCH)),
    ("/occ.v1.EventService/AroundIncident", Access::Roles(SEARCH)),
    ("/occ.v1.EventService/PlaceLegalHold", Access::Roles(SEARCH)),
    ("/occ.v1.EventService/ListLegalHolds", Access::Roles(SEARCH)),
    (
        "/occ.v1.EventService/ReleaseLegalHold",
        Access::Roles(SEARCH),
    ),
    ("/occ.v1.KeyService/CreateKey", Access::Roles(ADMIN)),
    ("/occ.v1.KeyService/ListKeys", Access::Roles(ADMIN)),
    ("/occ.v1.KeyService/RevokeKey", Access::Roles(ADMIN)),
];

/// Who may call the method at `path`.
pub fn access(path: &str, reflection: Reflection) -> Access {
    if path.starts_with("/grpc.health.v1.Health/") {
        return Access::Public;
    }
    if path.starts_with("/grpc.reflection.") {
        return match reflection {
            Reflection::Public => Access::Public,
            Reflection::Authenticated => Access::Roles(&Role::ALL),
            Reflection::Off => Access::Roles(NOBODY),
        };
    }
    METHODS
        .iter()
        .find(|(m, _)| *m == path)
        .map_or(Access::Roles(NOBODY), |(_, a)| *a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_of_the_api_has_a_row_and_no_row_is_stale() {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(occ_proto::v1::FILE_DESCRIPTOR_SET)
            .expect("descriptor set");
        let mut api: Vec<String> = set
            .file
            .iter()
            .flat_map(|f| {
                let package = f.package().to_owned();
                f.service.iter().flat_map(move |s| {
                    let package = package.clone();
                    s.method
                        .iter()
                        .map(move |m| format!("/{package}.{}/{}", s.name(), m.name()))
                })
            })
            .collect();
        api.sort();
        let mut table: Vec<String> = METHODS.iter().map(|(m, _)| (*m).to_owned()).collect();
        table.sort();
        assert_eq!(api, table);
    }

    #[test]
    fn an_unknown_method_is_closed_and_health_is_open() {
        let admin = Principal::unrestricted("key:root");
        assert!(!access("/occ.v1.SecretService/Everything", Reflection::Public).allows(&admin));
        assert_eq!(
            access("/grpc.health.v1.Health/Check", Reflection::Off),
            Access::Public
        );
        assert!(
            !access(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                Reflection::Off
            )
            .allows(&admin)
        );
    }
}
