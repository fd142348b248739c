//! Every example in `schemas/examples/` against its JSON Schema (draft 2020-12) and the Rust
//! types: valid ones pass both and round-trip; invalid ones fail both, with the reason their
//! file name states (`<reason>.<description>.json`).

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;
use towerstream::event::{parse_event, Event, InvalidReason};

const MAX_BYTES: usize = 64 * 1024;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemas")
}

fn schema_for(kind: &str) -> jsonschema::Validator {
    let path = root().join(format!("{kind}.schema.json"));
    let schema: Value = serde_json::from_str(&fs::read_to_string(&path).expect("schema file"))
        .expect("schema is JSON");
    assert!(
        jsonschema::meta::is_valid(&schema),
        "{} is not a valid 2020-12 schema",
        path.display()
    );
    jsonschema::validator_for(&schema).expect("schema compiles")
}

fn files(dir: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(root().join("examples").join(dir))
        .expect("examples dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no examples in {dir}");
    v
}

fn name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

#[test]
fn every_schema_has_valid_examples() {
    let covered: Vec<String> = files("valid")
        .iter()
        .map(|p| name(p).split('.').next().unwrap().to_owned())
        .collect();
    for kind in ["impression", "click", "item", "user"] {
        assert!(
            covered.iter().any(|c| c == kind),
            "no valid example for {kind}"
        );
    }
}

#[test]
fn valid_examples_pass_schema_and_round_trip_through_rust_types() {
    for path in files("valid") {
        let bytes = fs::read(&path).unwrap();
        let value: Value = serde_json::from_slice(&bytes).unwrap();
        let kind = value["type"].as_str().unwrap().to_owned();
        assert!(
            name(&path).starts_with(&kind),
            "{}: file name must start with its type",
            name(&path)
        );
        let schema = schema_for(&kind);
        let errors: Vec<String> = schema.iter_errors(&value).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{}: {errors:?}", name(&path));

        let event =
            parse_event(&bytes, MAX_BYTES).unwrap_or_else(|e| panic!("{}: {e}", name(&path)));
        assert_eq!(event.kind(), kind);
        // Rust → JSON stays schema-valid and parses back to the same value.
        let again = event.to_json();
        let again_value: Value = serde_json::from_slice(&again).unwrap();
        assert!(
            schema.is_valid(&again_value),
            "{}: re-serialised form is invalid",
            name(&path)
        );
        assert_eq!(
            parse_event(&again, MAX_BYTES).unwrap(),
            event,
            "{}",
            name(&path)
        );
        // The serde derive of Event (internally tagged) agrees with parse_event.
        let derived: Event = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(derived, event);
    }
}

#[test]
fn invalid_examples_are_rejected_by_schema_and_rust_with_the_named_reason() {
    let kinds = ["impression", "click", "item", "user"];
    for path in files("invalid") {
        let file = name(&path);
        let expected = InvalidReason::from_name(file.split('.').next().unwrap())
            .unwrap_or_else(|| panic!("{file}: name must start with a reason"));
        let bytes = fs::read(&path).unwrap();
        let err = parse_event(&bytes, MAX_BYTES).expect_err(&file);
        assert_eq!(err.reason, expected, "{file}: {err}");

        // The schemas must agree: no schema accepts it.
        match serde_json::from_slice::<Value>(&bytes) {
            Err(_) => assert_eq!(expected, InvalidReason::BadJson, "{file}"),
            Ok(value) => {
                let accepted: Vec<&str> = kinds
                    .iter()
                    .copied()
                    .filter(|k| schema_for(k).is_valid(&value))
                    .collect();
                assert!(accepted.is_empty(), "{file}: accepted by {accepted:?}");
                if expected == InvalidReason::MissingField {
                    if let Some(kind) = value["type"].as_str() {
                        let msgs: Vec<String> = schema_for(kind)
                            .iter_errors(&value)
                            .map(|e| e.to_string())
                            .collect();
                        assert!(
                            msgs.iter().any(|m| m.contains("required property")),
                            "{file}: {msgs:?}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn oversize_payloads_are_rejected_before_parsing() {
    let big = format!(
        r#"{{"type":"click","event_id":"e","event_time_ms":1,"user_id":"u","item_id":"i","pad":"{}"}}"#,
        "x".repeat(2000)
    );
    assert_eq!(
        parse_event(big.as_bytes(), 1024).unwrap_err().reason,
        InvalidReason::Oversize
    );
    assert!(parse_event(big.as_bytes(), 4096).is_ok());
}

/// `schemas/examples/mapped/`: a shop's own event and product, and the mapping that reads them.
#[test]
fn the_mapped_examples_decode_with_their_mapping() {
    use towerstream::mapping::Table;
    let dir = root().join("examples").join("mapped");
    let read = |name: &str| fs::read(dir.join(name)).expect("example file");
    let text = String::from_utf8(read("shop-mapping.toml")).expect("UTF-8");
    let config = towerstream::config::Config::from_toml(&text).expect("the mapping loads");
    config.validate().expect("the mapping is valid");
    let decoder = config.decoder().expect("the mapping compiles");
    let Event::Click(click) = decoder
        .decode(0, &read("shop-event.json"))
        .expect("decodes")
    else {
        panic!("the example event is a click");
    };
    assert_eq!(click.user_id.as_str(), "48213");
    assert_eq!(click.item_id.as_str(), "MUG-0042");
    assert_eq!(click.impression_id.as_deref(), Some("imp-2f7a"));
    assert_eq!(click.dwell_ms, Some(5400));
    assert_eq!(click.event_time_ms, 1_796_313_602_250, "16:00:02.250 UTC");
    let product = read("shop-product.json");
    let Event::Item(item) = decoder
        .decode_table(Table::Items, &product, None)
        .expect("decodes")
    else {
        panic!("the example product is an item");
    };
    assert_eq!(item.category.as_deref(), Some("kitchen"));
    assert_eq!(item.genres, vec!["gift", "camping"]);
    assert_eq!(item.dense.get("price"), Some(&12.5));
}
