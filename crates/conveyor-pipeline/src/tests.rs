//! The pipelines end to end, from a config file's text to outcomes.

use std::path::Path;

use crate::view::tests::event;
use crate::{Config, Outcome};

const EXAMPLE: &str = r#"
[sinks.warehouse]
type = "file"
path = "w.ndjson"

[sinks.alerts]
type = "file"
path = "a.ndjson"

[[pipelines]]
name = "sensors"
match = '.source | startswith("sensor-")'
stages = [
  { validate = "reading.json" },
  { transform = '.data.celsius = ((.data.fahrenheit - 32) * 5 / 9) | del(.data.fahrenheit)' },
  { filter = '.data.celsius > -60' },
]
route = [ { when = '.data.celsius > 40', to = ["alerts", "warehouse"] }, { to = ["warehouse"] } ]

[[pipelines]]
name = "batches"
match = '.source == "batch"'
stages = [ { transform = '.data.items[] as $i | .data = $i', split = true }, { filter = '.data > 1' } ]

[[tests]]
name = "hot readings alert"
input = { source = "sensor-1", data = { fahrenheit = 212 } }
expect = { data = { celsius = 100 }, to = ["alerts", "warehouse"] }

[[tests]]
name = "frozen readings are dropped"
input = { source = "sensor-1", data = { fahrenheit = -100 } }
expect = { drop = true }

[[tests]]
name = "a bad reading fails at validation"
input = { source = "sensor-1", data = { fahrenheit = "hot" } }
expect = { failure = { pipeline = "sensors", stage = "1-validate", reason = "/data/fahrenheit" } }
"#;

fn example() -> (tempfile::TempDir, Config) {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("reading.json"),
        r#"{"type":"object","required":["fahrenheit"],"properties":{"fahrenheit":{"type":"number"}}}"#,
    )
    .expect("schema written");
    let path = dir.path().join("conveyor.toml");
    std::fs::write(&path, EXAMPLE).expect("config written");
    let config = Config::load(&path).unwrap_or_else(|problems| panic!("{problems}"));
    (dir, config)
}

#[test]
fn the_example_routes_transforms_filters_and_fails_as_written() {
    let (_dir, config) = example();
    let pipelines = &config.pipelines;
    let Outcome::Routed(out) = pipelines.run(event("sensor-1", r#"{"fahrenheit":50}"#), &mut ())
    else {
        panic!("a mild reading passes");
    };
    assert_eq!(&out[0].event.payload[..], br#"{"celsius":10.0}"#);
    assert_eq!(&*out[0].sinks, [std::sync::Arc::from("warehouse")]);

    let Outcome::Routed(out) = pipelines.run(event("pump", r#"{"x":1}"#), &mut ()) else {
        panic!("an unmatched event passes to the default route");
    };
    assert_eq!(&out[0].event.payload[..], br#"{"x":1}"#);
    assert_eq!(&*out[0].sinks, [std::sync::Arc::from("default")]);

    let Outcome::Failed(failure) = pipelines.run(event("sensor-1", "{}"), &mut ()) else {
        panic!("a reading without fahrenheit fails");
    };
    assert_eq!(
        (&*failure.pipeline, &*failure.stage),
        ("sensors", "1-validate")
    );
    assert!(!failure.retryable);
}

#[test]
fn a_split_makes_events_with_derived_ids() {
    let (_dir, config) = example();
    let Outcome::Routed(out) = config
        .pipelines
        .run(event("batch", r#"{"items":[1,2,3]}"#), &mut ())
    else {
        panic!("a batch splits");
    };
    let ids: Vec<&str> = out.iter().map(|o| &*o.event.id).collect();
    assert_eq!(ids, ["e1/1", "e1/2"], "item 1 was filtered out");
    assert_eq!(&out[1].event.payload[..], b"3");

    let Outcome::Dropped { stage, .. } = config
        .pipelines
        .run(event("batch", r#"{"items":[]}"#), &mut ())
    else {
        panic!("an empty split drops");
    };
    assert_eq!(&*stage, "1-transform");
}

#[test]
fn the_files_own_tests_pass_and_a_wrong_expectation_fails() {
    let (_dir, config) = example();
    for test in &config.tests {
        test.run(&config.pipelines)
            .unwrap_or_else(|why| panic!("{}: {why}", test.name));
    }
    let wrong = Config::parse(
        Path::new("x.toml"),
        r#"
[[pipelines]]
name = "p"
stages = [ { transform = '.data.a = 2' } ]

[[tests]]
name = "wrong"
input = { source = "s", data = { a = 1 } }
expect = { data = { a = 3 } }
"#,
    )
    .expect("valid");
    let why = wrong.tests[0]
        .run(&wrong.pipelines)
        .expect_err("2 is not 3");
    assert!(why.contains(r#"data {"a":2} (expected {"a":3})"#), "{why}");
}

#[test]
fn more_than_one_output_without_split_is_a_permanent_failure() {
    let config = Config::parse(
        Path::new("x.toml"),
        "[[pipelines]]\nname = \"p\"\nstages = [ { transform = '., .' } ]\n",
    )
    .expect("valid");
    let Outcome::Failed(failure) = config.pipelines.run(event("s", "{}"), &mut ()) else {
        panic!("two outputs fail");
    };
    assert!(
        failure.reason.contains("2 outputs") && !failure.retryable,
        "{failure}"
    );
}
