//! Helpers for the adapters' tests: fixtures, and mutations of valid messages for property
//! tests (every mutation must decode to events or to a rejection, never panic).

use proptest::prelude::*;
use serde_json::Value;

/// A fixture from `tests/fixtures/`.
pub fn fixture(path: &str) -> Vec<u8> {
    let full = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/");
    std::fs::read(format!("{full}{path}")).unwrap_or_else(|e| panic!("fixture {path}: {e}"))
}

pub fn fixture_json(path: &str) -> Value {
    serde_json::from_slice(&fixture(path)).expect("fixture is JSON")
}

/// Any JSON value, a few levels deep.
pub fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (-1e12..1e12f64).prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// `value` with the node at position `pick` (in a depth-first walk) replaced by
/// `replacement`, or removed when `replacement` is `None` and the node is an object member.
pub fn mutate(mut value: Value, pick: usize, replacement: Option<Value>) -> Value {
    let count = count_nodes(&value);
    let target = pick % count.max(1);
    let mut seen = 0;
    replace(&mut value, target, &mut seen, replacement);
    value
}

fn count_nodes(v: &Value) -> usize {
    1 + match v {
        Value::Array(a) => a.iter().map(count_nodes).sum(),
        Value::Object(o) => o.values().map(count_nodes).sum(),
        _ => 0,
    }
}

fn replace(v: &mut Value, target: usize, seen: &mut usize, with: Option<Value>) -> bool {
    if *seen == target {
        *v = with.unwrap_or(Value::Null);
        return true;
    }
    *seen += 1;
    match v {
        Value::Array(a) => {
            for item in a.iter_mut() {
                if replace(item, target, seen, with.clone()) {
                    return true;
                }
            }
        }
        Value::Object(o) => {
            let keys: Vec<String> = o.keys().cloned().collect();
            for k in keys {
                if *seen == target && with.is_none() {
                    o.remove(&k);
                    return true;
                }
                if let Some(item) = o.get_mut(&k)
                    && replace(item, target, seen, with.clone())
                {
                    return true;
                }
            }
        }
        _ => {}
    }
    false
}
