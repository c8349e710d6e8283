//! Watch lists: plates the police want to know about, with the reason and until when. A
//! recognised plate is matched in its normalised form, so the usual differences of licence
//! plate readers (spacing, case, separators, Cyrillic letters that look like Latin ones) do not
//! hide a wanted car.

use std::collections::HashMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::validation::{Collector, FieldError, FieldErrors};

/// A plate in the form OCC compares: upper-case Latin letters and digits only.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Plate(String);

impl Plate {
    pub const MAX_LEN: usize = 16;

    /// Normalises a plate as read or written: letters upper-cased, Cyrillic letters that look
    /// like Latin ones (as on plates that use both alphabets) read as Latin, and everything
    /// that is neither a letter nor a digit (spaces, dashes, dots, a reader's `|`) dropped.
    /// `None` when nothing is left, or more than [`Self::MAX_LEN`] characters.
    pub fn normalize(raw: &str) -> Option<Plate> {
        let mut out = String::with_capacity(raw.len());
        for c in raw.chars().flat_map(char::to_uppercase) {
            // A letter of another alphabet without a Latin twin stays, upper-cased.
            let c = latin_lookalike(c).unwrap_or(c);
            if c.is_alphanumeric() {
                out.push(c);
            }
        }
        (!out.is_empty() && out.chars().count() <= Self::MAX_LEN).then_some(Plate(out))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn from_stored(value: String) -> Self {
        Self(value)
    }
}

impl fmt::Display for Plate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The Latin letter a Cyrillic one is written like on a plate (А В Е К М Н О Р С Т У Х).
fn latin_lookalike(c: char) -> Option<char> {
    Some(match c {
        'А' | 'а' => 'A',
        'В' | 'в' => 'B',
        'Е' | 'е' => 'E',
        'К' | 'к' => 'K',
        'М' | 'м' => 'M',
        'Н' | 'н' => 'H',
        'О' | 'о' => 'O',
        'Р' | 'р' => 'P',
        'С' | 'с' => 'C',
        'Т' | 'т' => 'T',
        'У' | 'у' => 'Y',
        'Х' | 'х' => 'X',
        _ => return None,
    })
}

/// An entry as written, before it is checked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WatchEntryInput {
    /// The plate as the police wrote it.
    pub plate: String,
    /// Which list (`stolen_vehicles`, `amber_alert`).
    pub list: String,
    /// Why the plate is wanted; shown to the operator who handles a hit.
    pub reason: String,
    pub expires_at: Option<DateTime<Utc>>,
}

/// A checked watch-list entry.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchEntry {
    pub id: Uuid,
    pub plate: Plate,
    /// The plate as written.
    pub display: String,
    pub list: String,
    pub reason: String,
    pub expires_at: Option<DateTime<Utc>>,
}

impl WatchEntry {
    pub fn parse(
        id: Uuid,
        input: WatchEntryInput,
        now: DateTime<Utc>,
    ) -> Result<WatchEntry, FieldErrors> {
        let mut c = Collector::default();
        let plate = Plate::normalize(&input.plate);
        if plate.is_none() {
            c.push(
                "plate",
                format!(
                    "must have 1 to {} letters or digits, got {:?}",
                    Plate::MAX_LEN,
                    input.plate
                ),
            );
        }
        let list = input.list.trim().to_owned();
        if let Err(e) = crate::validation::text("list", &list, 64) {
            c.take::<()>(Err(e));
        }
        if input.reason.len() > 1000 {
            c.push("reason", "must be at most 1000 bytes");
        }
        if let Some(at) = input.expires_at
            && at <= now
        {
            c.push(
                "expires_at",
                format!("must be in the future, got {}", at.to_rfc3339()),
            );
        }
        c.finish(|| WatchEntry {
            id,
            plate: plate.expect("checked"),
            display: input.plate.trim().to_owned(),
            list,
            reason: input.reason,
            expires_at: input.expires_at,
        })
    }

    pub fn active_at(&self, at: DateTime<Utc>) -> bool {
        self.expires_at.is_none_or(|e| at < e)
    }
}

/// The entries in force, by normalised plate.
#[derive(Debug, Clone, Default)]
pub struct WatchList {
    by_plate: HashMap<Plate, Vec<WatchEntry>>,
}

impl WatchList {
    pub fn new(entries: Vec<WatchEntry>) -> Self {
        let mut by_plate: HashMap<Plate, Vec<WatchEntry>> = HashMap::new();
        for e in entries {
            by_plate.entry(e.plate.clone()).or_default().push(e);
        }
        Self { by_plate }
    }

    pub fn len(&self) -> usize {
        self.by_plate.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_plate.is_empty()
    }

    /// The entry a plate read at `at` hits, if any (the first to expire last when several lists
    /// hold the plate).
    pub fn find(&self, plate: &Plate, at: DateTime<Utc>) -> Option<&WatchEntry> {
        self.by_plate
            .get(plate)?
            .iter()
            .filter(|e| e.active_at(at))
            .max_by_key(|e| e.expires_at.map_or(i64::MAX, |t| t.timestamp()))
    }
}

/// Checks a plate written in a request, for look-ups.
pub fn parse_plate(field: &str, raw: &str) -> Result<Plate, FieldError> {
    Plate::normalize(raw).ok_or_else(|| {
        FieldError::new(
            field,
            format!(
                "must have 1 to {} letters or digits, got {raw:?}",
                Plate::MAX_LEN
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 25, 6, 0, 0)
            .single()
            .expect("valid time")
    }

    fn entry(plate: &str, expires: Option<DateTime<Utc>>) -> WatchEntry {
        WatchEntry::parse(
            Uuid::now_v7(),
            WatchEntryInput {
                plate: plate.into(),
                list: "stolen_vehicles".into(),
                reason: "reported stolen".into(),
                expires_at: expires,
            },
            now(),
        )
        .expect("valid entry")
    }

    #[test]
    fn reader_spellings_of_one_plate_normalise_alike() {
        let want = Plate::normalize("777ABC01").expect("plate");
        for read in [
            "777 ABC 01",
            "777abc01",
            "777-ABC-01",
            " 777.abc.01 ",
            "777АВС01", // Cyrillic А, В, С
            "777 аbс|01",
        ] {
            assert_eq!(Plate::normalize(read).as_ref(), Some(&want), "{read:?}");
        }
        assert_ne!(Plate::normalize("777ABC02"), Some(want));
        assert_eq!(Plate::normalize(" - "), None);
        assert_eq!(Plate::normalize(&"A".repeat(17)), None);
    }

    #[test]
    fn expired_entries_do_not_hit() {
        let list = WatchList::new(vec![entry(
            "505 AAA 02",
            Some(now() + chrono::TimeDelta::hours(1)),
        )]);
        let plate = Plate::normalize("505aaa02").expect("plate");
        assert!(list.find(&plate, now()).is_some());
        assert!(
            list.find(&plate, now() + chrono::TimeDelta::hours(2))
                .is_none()
        );
    }

    #[test]
    fn entries_are_checked() {
        let err = WatchEntry::parse(
            Uuid::now_v7(),
            WatchEntryInput {
                plate: "--".into(),
                list: String::new(),
                reason: String::new(),
                expires_at: Some(now() - chrono::TimeDelta::seconds(1)),
            },
            now(),
        )
        .expect_err("invalid");
        let fields: Vec<_> = err.errors().iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["plate", "list", "expires_at"]);
    }

    proptest! {
        /// Normalising never panics and is idempotent, whatever a reader sends.
        #[test]
        fn normalising_never_panics_and_is_idempotent(raw in "\\PC{0,24}") {
            if let Some(p) = Plate::normalize(&raw) {
                prop_assert_eq!(Plate::normalize(p.as_str()), Some(p.clone()));
            }
        }

        /// Separators and case never change which plate it is.
        #[test]
        fn separators_and_case_do_not_matter(
            raw in "[A-Za-z0-9АВСЕКМНОРТХУавсекмнортху]{1,16}",
            sep in "[ .|_-]{0,2}",
        ) {
            let spaced: String = raw.chars().flat_map(|c| [c.to_string(), sep.clone()]).collect();
            prop_assert_eq!(Plate::normalize(&spaced.to_lowercase()), Plate::normalize(&raw));
        }
    }
}
