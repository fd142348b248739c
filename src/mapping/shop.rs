//! The example shop of `schemas/examples/mapped/`: towerstream's events written the way that
//! shop's tracker and catalogue service write them, and the mapping that reads them back.
//!
//! `towerstream replay --shape shop` (and `scripts/demo --mapping`) publishes a dataset in this
//! shape, and `cargo bench --bench ingest` decodes it, so the demo and the benchmark go
//! through the mapping a real integration would, not only towerstream's own schema. Profiles
//! stay in towerstream's schema (the example mapping has no `[mapping.users]`).

use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;

use crate::event::Event;

/// `schemas/examples/mapped/shop-mapping.toml`: the configuration that reads this shape.
pub const MAPPING_TOML: &str = include_str!("../../schemas/examples/mapped/shop-mapping.toml");

fn iso(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// `e` as the shop would publish it: impressions and clicks as tracker events with an
/// `action`, items as catalogue products; user events unchanged. Only what the mapping reads
/// back is kept (an impression's `surface` is not).
pub fn encode(e: &Event) -> Vec<u8> {
    let v = match e {
        Event::Impression(i) => json!({
            "action": "view",
            "meta": {"event_uuid": i.event_id, "impression": i.impression_id,
                     "page_view": i.request_id},
            "user": {"id": i.user_id.as_str(), "segment": "returning"},
            "product": {"sku": i.item_id.as_str()},
            "occurred_at": iso(i.event_time_ms),
            "slot": i.position,
        }),
        Event::Click(c) => {
            let mut v = json!({
                "action": "click",
                "meta": {"event_uuid": c.event_id},
                "user": {"id": c.user_id.as_str(), "segment": "returning"},
                "product": {"sku": c.item_id.as_str()},
                "occurred_at": iso(c.event_time_ms),
            });
            if let Some(imp) = &c.impression_id {
                v["meta"]["impression"] = json!(imp);
            }
            if let Some(d) = c.dwell_ms {
                v["engagement"] = json!({"dwell_ms": d});
            }
            v
        }
        Event::Item(i) => {
            let mut v = Map::new();
            v.insert("sku".into(), json!(i.item_id.as_str()));
            v.insert("updated_at".into(), json!(iso(i.event_time_ms)));
            if let Some(t) = &i.title {
                v.insert("name".into(), json!(t));
            }
            if let Some(c) = &i.category {
                v.insert("category".into(), json!({"name": c}));
            }
            v.insert("tags".into(), json!(i.genres));
            if let Some(p) = i.dense.get("price") {
                v.insert(
                    "price".into(),
                    json!({"amount": p.to_string(), "currency": "EUR"}),
                );
            }
            let status = match i.op {
                crate::event::Op::Upsert => "active",
                crate::event::Op::Delete => "archived",
            };
            v.insert("status".into(), json!(status));
            Value::Object(v)
        }
        Event::User(_) => return e.to_json(),
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::event::{Click, Dense, Impression, ItemEvent, Op};
    use crate::mapping::Table;

    #[test]
    fn the_shop_shape_reads_back_through_its_mapping_as_the_same_events() {
        let config = Config::from_toml(MAPPING_TOML).expect("the example mapping loads");
        let decoder = config.decoder().expect("and compiles");
        let t = 1_796_317_200_250;
        let impression = Event::Impression(Impression {
            event_id: "e1".into(),
            event_time_ms: t,
            user_id: "42".into(),
            item_id: "A-1".into(),
            impression_id: "imp-1".into(),
            request_id: "pv-1".into(),
            position: 3,
            surface: None,
        });
        let click = Event::Click(Click {
            event_id: "e2".into(),
            event_time_ms: t + 1000,
            user_id: "42".into(),
            item_id: "A-1".into(),
            impression_id: Some("imp-1".into()),
            dwell_ms: Some(5400),
        });
        let bare_click = Event::Click(Click {
            impression_id: None,
            dwell_ms: None,
            event_id: "e3".into(),
            ..match &click {
                Event::Click(c) => c.clone(),
                _ => unreachable!(),
            }
        });
        for e in [impression, click, bare_click] {
            assert_eq!(decoder.decode(0, &encode(&e)).unwrap(), e);
        }
        let item = Event::Item(ItemEvent {
            event_id: "x".into(),
            event_time_ms: t,
            item_id: "A-1".into(),
            op: Op::Delete,
            title: Some("Mug".into()),
            category: Some("kitchen".into()),
            genres: vec!["gift".into()],
            dense: Dense::from([("price".to_string(), 12.5)]),
        });
        let Event::Item(back) = decoder
            .decode_table(Table::Items, &encode(&item), None)
            .unwrap()
        else {
            panic!("not an item")
        };
        let Event::Item(want) = item else {
            unreachable!()
        };
        // The shop's products carry no event id: it is derived from the payload.
        assert!(back.event_id.starts_with('h'));
        assert_eq!(
            ItemEvent {
                event_id: "x".into(),
                ..back
            },
            want
        );
    }
}
