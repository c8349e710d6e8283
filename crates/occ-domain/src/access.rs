//! Who may do what: the roles a caller holds, the queues and agencies it works for, and the
//! decisions made from them.
//!
//! An authenticated caller becomes a [`Principal`]. Which RPCs a role may call is decided once,
//! per method, in front of every service; which incidents, queues and units it may touch is
//! decided here, from its [`Scope`]. An incident outside the scope does not exist for the
//! caller (`NOT_FOUND`, never a hint); a queue or unit outside it is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::glob::Glob;

/// What a caller is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// A sensor or camera gateway: publishes events, for the sources it is bound to.
    Gateway,
    /// A dispatch operator: claims, dispatches, updates and annotates its queues' incidents,
    /// and works its agencies' units.
    Dispatcher,
    /// A dispatcher's rights over its agencies' queues, plus transfers, escalation
    /// acknowledgements, units, sources, dead letters and watch lists.
    Supervisor,
    /// Another agency's system (a police or fire CAD link): reads and watches its queues'
    /// incidents and adds notes; updates their status only if granted.
    Integration,
    /// The city's IT: rules, queues, sources, zones and keys. No incident data unless also
    /// granted queues.
    Admin,
    /// An investigator of an agency (a police detective): searches stored events of the kinds
    /// granted to its agencies, for a named case, every search on the record; reads its
    /// agencies' incidents. Changes nothing.
    Investigator,
}

impl Role {
    pub const ALL: [Role; 6] = [
        Role::Gateway,
        Role::Dispatcher,
        Role::Supervisor,
        Role::Integration,
        Role::Admin,
        Role::Investigator,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Dispatcher => "dispatcher",
            Role::Supervisor => "supervisor",
            Role::Integration => "integration",
            Role::Admin => "admin",
            Role::Investigator => "investigator",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of roles.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Roles(u8);

impl Roles {
    pub const NONE: Roles = Roles(0);

    pub fn all() -> Roles {
        Roles::from_iter(Role::ALL)
    }

    pub fn contains(self, role: Role) -> bool {
        self.0 & role.bit() != 0
    }

    /// Whether any of `roles` is held.
    pub fn any(self, roles: &[Role]) -> bool {
        roles.iter().any(|r| self.contains(*r))
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Role> {
        Role::ALL.into_iter().filter(move |r| self.contains(*r))
    }

    /// Parses role names, naming the first unknown one.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<Roles, String> {
        names.iter().try_fold(Roles::NONE, |acc, name| {
            let name = name.as_ref().trim();
            Role::parse(name).map(|r| Roles(acc.0 | r.bit())).ok_or_else(|| {
                format!(
                    "unknown role {name:?} (roles: gateway, dispatcher, supervisor, integration, admin, investigator)"
                )
            })
        })
    }

    pub fn names(self) -> Vec<String> {
        self.iter().map(|r| r.as_str().to_owned()).collect()
    }
}

impl FromIterator<Role> for Roles {
    fn from_iter<I: IntoIterator<Item = Role>>(iter: I) -> Self {
        Roles(iter.into_iter().fold(0, |acc, r| acc | r.bit()))
    }
}

impl fmt::Display for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.names().join(","))
    }
}

/// The queues (and through them the agencies) a caller works for. `*` stands for every queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    all: bool,
    queues: BTreeSet<String>,
    agencies: BTreeSet<String>,
}

/// Grants `*`: every queue and agency.
pub const EVERY_QUEUE: &str = "*";

impl Scope {
    /// Every queue and agency.
    pub fn everything() -> Scope {
        Scope {
            all: true,
            ..Scope::default()
        }
    }

    /// The queues named, the queues of the agencies named, and the agencies of all of them,
    /// given where each queue belongs (`queue → agency`). A queue not (yet) configured is kept
    /// as named: it takes effect when an administrator creates it.
    pub fn resolve<S: AsRef<str>>(
        queues: &[S],
        agencies: &[S],
        queue_agency: &BTreeMap<String, String>,
    ) -> Scope {
        if queues
            .iter()
            .chain(agencies)
            .any(|q| q.as_ref() == EVERY_QUEUE)
        {
            return Scope::everything();
        }
        let mut scope = Scope::default();
        for a in agencies {
            scope.agencies.insert(a.as_ref().to_owned());
        }
        for (queue, agency) in queue_agency {
            if scope.agencies.contains(agency) {
                scope.queues.insert(queue.clone());
            }
        }
        for q in queues {
            scope.queues.insert(q.as_ref().to_owned());
            if let Some(agency) = queue_agency.get(q.as_ref()) {
                scope.agencies.insert(agency.clone());
            }
        }
        scope
    }

    pub fn is_everything(&self) -> bool {
        self.all
    }

    pub fn is_empty(&self) -> bool {
        !self.all && self.queues.is_empty() && self.agencies.is_empty()
    }

    /// Whether incidents of `queue` are in scope.
    pub fn queue(&self, queue: &str) -> bool {
        self.all || self.queues.contains(queue)
    }

    /// Whether units of `agency` are in scope.
    pub fn agency(&self, agency: &str) -> bool {
        self.all || self.agencies.contains(agency)
    }

    /// The queues in scope; `None` for every queue.
    pub fn queues(&self) -> Option<Vec<String>> {
        (!self.all).then(|| self.queues.iter().cloned().collect())
    }

    /// The agencies in scope; `None` for every agency.
    pub fn agencies(&self) -> Option<Vec<String>> {
        (!self.all).then(|| self.agencies.iter().cloned().collect())
    }
}

/// An authenticated caller: who it is (as audit entries name it), its roles and scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// How audit entries and claims name the caller: `key:police-cad`, `user:alice`,
    /// `cert:cad.police.example`.
    pub subject: String,
    pub roles: Roles,
    /// The queues whose incidents it sees and the agencies whose units it works.
    pub scope: Scope,
    /// For a gateway: the sources it may publish for (globs); empty for any source.
    pub sources: Vec<Glob>,
    /// For an integration: whether it may change its incidents' status.
    pub may_update_status: bool,
}

impl Principal {
    /// A caller with every right, when OCC runs without authentication (`--insecure`).
    pub fn unrestricted(subject: impl Into<String>) -> Principal {
        Principal {
            subject: subject.into(),
            roles: Roles::all(),
            scope: Scope::everything(),
            sources: Vec::new(),
            may_update_status: true,
        }
    }

    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(role)
    }

    /// Whether the roles that read incidents (dispatcher, supervisor, integration,
    /// investigator, or an admin granted queues) let it see incidents of `queue`.
    pub fn sees_queue(&self, queue: &str) -> bool {
        self.roles.any(&[
            Role::Dispatcher,
            Role::Supervisor,
            Role::Integration,
            Role::Admin,
            Role::Investigator,
        ]) && self.scope.queue(queue)
    }

    /// Whether it may work units of `agency`.
    pub fn works_agency(&self, agency: &str) -> bool {
        self.roles.any(&[Role::Dispatcher, Role::Supervisor]) && self.scope.agency(agency)
    }

    /// Whether it may publish events for `source`.
    pub fn may_publish(&self, source: &str) -> bool {
        self.has(Role::Gateway)
            && (self.sources.is_empty() || self.sources.iter().any(|g| g.is_match(source)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queues() -> BTreeMap<String, String> {
        [
            ("police", "police"),
            ("police-traffic", "police"),
            ("fire", "fire"),
            ("ems", "ems"),
        ]
        .into_iter()
        .map(|(q, a)| (q.to_owned(), a.to_owned()))
        .collect()
    }

    #[test]
    fn a_queue_brings_its_agency_and_an_agency_all_its_queues() {
        let dispatcher = Scope::resolve(&["police"], &[], &queues());
        assert!(dispatcher.queue("police"));
        assert!(!dispatcher.queue("police-traffic"));
        assert!(dispatcher.agency("police"));
        assert!(!dispatcher.agency("fire"));

        let supervisor = Scope::resolve(&[], &["police"], &queues());
        assert!(supervisor.queue("police") && supervisor.queue("police-traffic"));
        assert!(!supervisor.queue("fire"));

        assert!(Scope::resolve(&["*"], &[], &queues()).queue("anything"));
        assert!(Scope::resolve::<&str>(&[], &[], &queues()).is_empty());
    }

    #[test]
    fn an_admin_sees_incidents_only_when_granted_queues() {
        let mut admin = Principal::unrestricted("key:it");
        admin.roles = Roles::from_iter([Role::Admin]);
        admin.scope = Scope::default();
        assert!(!admin.sees_queue("police"));
        admin.scope = Scope::resolve(&["fire"], &[], &queues());
        assert!(admin.sees_queue("fire"));
        assert!(!admin.sees_queue("police"));
        assert!(!admin.works_agency("fire"), "admins do not work units");
    }

    #[test]
    fn a_gateway_publishes_only_for_its_sources() {
        let mut gateway = Principal::unrestricted("key:esil-gw");
        gateway.roles = Roles::from_iter([Role::Gateway]);
        assert!(gateway.may_publish("anything"));
        gateway.sources = vec![Glob::new("esil-*")];
        assert!(gateway.may_publish("esil-smoke-1"));
        assert!(!gateway.may_publish("almaty-smoke-1"));
        gateway.roles = Roles::from_iter([Role::Dispatcher]);
        assert!(!gateway.may_publish("esil-smoke-1"));
    }

    #[test]
    fn roles_parse_and_print() {
        let roles = Roles::parse(&["admin", " supervisor"]).expect("known roles");
        assert_eq!(roles.to_string(), "supervisor,admin");
        assert!(Roles::parse(&["root"]).unwrap_err().contains("\"root\""));
    }
}
