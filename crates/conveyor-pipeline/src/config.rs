//! The config file (`--config FILE`, TOML): named sinks, schemas at the door, pipelines and
//! their tests. docs/PIPELINES.md documents every key.
//!
//! Loading checks everything that can be checked without a network: the TOML, every key (an
//! unknown one is an error, so a typo is not silently ignored), every jq program (compiled),
//! every schema (read and compiled), and every route's sinks (declared). Each problem is
//! reported with the file, line and column it is at, all of them at once.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::jq::{Budget, Program};
use crate::pipeline::{DEFAULT_SINK, Pipeline, Pipelines, Route, SinkNames, Stage, StageKind};
use crate::schema::{DoorSchemas, Schema};
use crate::shorthand::Shorthand;
use crate::testing::TestCase;

/// One problem in a config file, where it is (line and column from 1; line 0 when the problem
/// is the file as a whole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            // About the file as a whole (it cannot be read): no place in it.
            return write!(f, "{}: {}", self.file.display(), self.message);
        }
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )
    }
}

/// Every problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// A sink the file declares: its name and its settings (`type` and the type's own keys), read
/// by the processor, which knows the sink types.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkDecl {
    pub name: String,
    pub settings: serde_json::Value,
    /// Where it is declared, to place a problem with its settings.
    pub line: usize,
    pub column: usize,
}

/// A loaded config file.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub sinks: Vec<SinkDecl>,
    pub door: DoorSchemas,
    pub pipelines: Pipelines,
    pub tests: Vec<TestCase>,
}

impl Config {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Config, Problems> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Problems(vec![Problem {
                file: path.to_owned(),
                line: 0,
                column: 0,
                message: format!("cannot read the config file: {e}"),
            }])
        })?;
        Self::parse(path, &text)
    }

    /// Checks `text`, the contents of the file at `path` (relative paths in it are read from
    /// the file's directory).
    pub fn parse(path: &Path, text: &str) -> Result<Config, Problems> {
        let mut ctx = Loading {
            path,
            text,
            dir: path.parent().unwrap_or(Path::new(".")).to_owned(),
            problems: Vec::new(),
        };
        let file: FileBlock = match toml::from_str(text) {
            Ok(file) => file,
            Err(error) => {
                let start = error.span().map_or(0, |s| s.start);
                ctx.problem(start, error.message().trim_end().to_owned());
                return Err(Problems(ctx.problems));
            }
        };
        let config = ctx.build(file);
        if ctx.problems.is_empty() {
            Ok(config)
        } else {
            Err(Problems(ctx.problems))
        }
    }

    /// Lines describing what the file holds, for `conveyor validate`.
    pub fn summary(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for sink in &self.sinks {
            lines.push(format!("sink {}: {}", sink.name, sink.settings));
        }
        lines.push(format!("door schemas: {}", self.door.len()));
        for pipeline in &self.pipelines.pipelines {
            let stages: Vec<&str> = pipeline.stages.iter().map(|s| &*s.name).collect();
            let routes: Vec<String> = pipeline
                .routes
                .iter()
                .map(|r| {
                    let to = r.to.join("+");
                    match &r.when {
                        Some(when) => format!("when {} -> {to}", when.code()),
                        None => format!("-> {to}"),
                    }
                })
                .collect();
            lines.push(format!(
                "pipeline {}: match {}; stages [{}]; routes [{}]",
                pipeline.name,
                pipeline.matcher.as_ref().map_or("everything", |m| m.code()),
                stages.join(", "),
                routes.join("; ")
            ));
        }
        lines.push(format!(
            "default route: {}",
            self.pipelines.default_route.join("+")
        ));
        lines.push(format!("tests: {}", self.tests.len()));
        lines
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBlock {
    #[serde(default)]
    defaults: DefaultsBlock,
    #[serde(default)]
    sinks: BTreeMap<String, Spanned<toml::Table>>,
    #[serde(default)]
    schemas: Vec<DoorSchemaBlock>,
    #[serde(default)]
    pipelines: Vec<PipelineBlock>,
    #[serde(default)]
    tests: Vec<crate::testing::TestBlock>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DefaultsBlock {
    /// Where events no pipeline matches go (and a pipeline's survivors no route takes).
    route: Option<Vec<Spanned<String>>>,
    /// The work one jq program may do on one event.
    budget: Option<BudgetBlock>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetBlock {
    steps: Option<u64>,
    time_ms: Option<u64>,
    outputs: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DoorSchemaBlock {
    source: String,
    schema: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PipelineBlock {
    name: Spanned<String>,
    #[serde(rename = "match")]
    matcher: Option<Spanned<String>>,
    #[serde(default)]
    stages: Vec<Spanned<StageBlock>>,
    #[serde(default)]
    route: Vec<RouteBlock>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StageBlock {
    name: Option<String>,
    validate: Option<Spanned<String>>,
    transform: Option<Spanned<String>>,
    split: Option<bool>,
    filter: Option<Spanned<String>>,
    stage: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteBlock {
    when: Option<Spanned<String>>,
    to: Spanned<Vec<Spanned<String>>>,
}

/// Names of sinks, pipelines and stages become metric labels and appear in messages: short
/// identifiers only.
fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

const NAME_RULE: &str = "1 to 64 of A-Z a-z 0-9 _ - .";

pub(crate) struct Loading<'a> {
    path: &'a Path,
    text: &'a str,
    dir: PathBuf,
    problems: Vec<Problem>,
}

impl Loading<'_> {
    /// Line and column (1-based) of a byte offset into the file.
    fn position(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, column)
    }

    pub(crate) fn problem(&mut self, offset: usize, message: String) {
        let (line, column) = self.position(offset);
        self.problems.push(Problem {
            file: self.path.to_owned(),
            line,
            column,
            message,
        });
    }

    /// Where the contents of the TOML string at `span` start (past its opening quotes).
    fn string_start(&self, span: std::ops::Range<usize>) -> usize {
        let raw = &self.text[span.start.min(self.text.len())..];
        let quotes = if raw.starts_with("'''") || raw.starts_with("\"\"\"") {
            3 + usize::from(raw[3..].starts_with('\n'))
        } else {
            1
        };
        span.start + quotes
    }

    /// Compiles a jq program written in the file; `what` says which (e.g. `pipeline sensors
    /// stage 2-transform`).
    pub(crate) fn program(&mut self, code: &Spanned<String>, what: &str) -> Option<Program> {
        match Program::compile(code.get_ref()) {
            Ok(program) => Some(program),
            Err(error) => {
                let at = self.string_start(code.span()) + error.offset;
                self.problem(at, format!("{what}: jq: {}", error.message));
                None
            }
        }
    }

    fn schema(&mut self, path: &Spanned<String>, what: &str) -> Option<Schema> {
        let file = self.dir.join(path.get_ref());
        match Schema::load(&file) {
            Ok(schema) => Some(schema),
            Err(error) => {
                self.problem(path.span().start, format!("{what}: {error}"));
                None
            }
        }
    }

    fn build(&mut self, file: FileBlock) -> Config {
        let sinks: Vec<SinkDecl> = file
            .sinks
            .into_iter()
            .map(|(name, table)| {
                let (line, column) = self.position(table.span().start);
                let settings =
                    serde_json::to_value(table.get_ref()).unwrap_or(serde_json::Value::Null);
                if !is_name(&name) {
                    self.problem(
                        table.span().start,
                        format!("sink name '{name}' is not a name ({NAME_RULE})"),
                    );
                }
                if table.get_ref().get("type").is_none() {
                    self.problem(
                        table.span().start,
                        format!("sink {name}: no `type` (file, stdout or blackhole)"),
                    );
                }
                SinkDecl {
                    name,
                    settings,
                    line,
                    column,
                }
            })
            .collect();
        let declared = |name: &str| name == DEFAULT_SINK || sinks.iter().any(|s| s.name == name);
        let sink_list = |ctx: &mut Self, names: &[Spanned<String>], what: &str| -> SinkNames {
            for name in names {
                if !declared(name.get_ref()) {
                    ctx.problem(
                        name.span().start,
                        format!(
                            "{what}: no sink named '{}' (declare it as [sinks.{}], or use 'default')",
                            name.get_ref(),
                            name.get_ref()
                        ),
                    );
                }
            }
            names
                .iter()
                .map(|n| Arc::from(n.get_ref().as_str()))
                .collect()
        };

        let default_route = match &file.defaults.route {
            Some(route) if route.is_empty() => {
                self.problem(0, "defaults.route: names no sink".into());
                Arc::from(Vec::new())
            }
            Some(route) => sink_list(self, route, "defaults.route"),
            None => Arc::from(vec![Arc::<str>::from(DEFAULT_SINK)]),
        };
        let mut budget = Budget::default();
        if let Some(block) = &file.defaults.budget {
            budget.steps = block.steps.unwrap_or(budget.steps);
            budget.time = block.time_ms.map_or(budget.time, Duration::from_millis);
            budget.outputs = block.outputs.unwrap_or(budget.outputs);
        }

        let door = DoorSchemas::new(
            file.schemas
                .iter()
                .filter_map(|rule| {
                    let what = format!("schema for sources '{}'", rule.source);
                    self.schema(&rule.schema, &what)
                        .map(|schema| (rule.source.clone(), schema))
                })
                .collect(),
        );

        let mut names: Vec<String> = Vec::new();
        let mut pipelines = Vec::new();
        for block in &file.pipelines {
            let name = block.name.get_ref().clone();
            if !is_name(&name) {
                self.problem(
                    block.name.span().start,
                    format!("pipeline name '{name}' is not a name ({NAME_RULE})"),
                );
            } else if names.contains(&name) {
                self.problem(
                    block.name.span().start,
                    format!("two pipelines are named '{name}'"),
                );
            }
            names.push(name.clone());
            let what = format!("pipeline {name}");
            let matcher = block
                .matcher
                .as_ref()
                .and_then(|code| self.program(code, &format!("{what} match")));
            let mut stages = Vec::new();
            let mut stage_names: Vec<String> = Vec::new();
            for (i, stage) in block.stages.iter().enumerate() {
                if let Some(stage) = self.stage(&what, i, stage, &mut stage_names) {
                    stages.push(stage);
                }
            }
            let mut routes = Vec::new();
            for (i, route) in block.route.iter().enumerate() {
                let what = format!("{what} route {}", i + 1);
                if route.to.get_ref().is_empty() {
                    self.problem(route.to.span().start, format!("{what}: `to` names no sink"));
                }
                let when = route
                    .when
                    .as_ref()
                    .and_then(|code| self.program(code, &format!("{what} when")));
                routes.push(Route {
                    when,
                    to: sink_list(self, route.to.get_ref(), &what),
                });
            }
            pipelines.push(Pipeline {
                name: name.into(),
                matcher,
                stages,
                routes,
            });
        }

        let pipelines = Pipelines {
            pipelines,
            default_route,
            budget,
        };
        let tests = file
            .tests
            .into_iter()
            .enumerate()
            .filter_map(|(i, block)| TestCase::from_block(self, i, block))
            .collect();
        Config {
            path: self.path.to_owned(),
            sinks,
            door,
            pipelines,
            tests,
        }
    }

    fn stage(
        &mut self,
        pipeline: &str,
        index: usize,
        block: &Spanned<StageBlock>,
        names: &mut Vec<String>,
    ) -> Option<Stage> {
        let at = block.span().start;
        let stage = block.get_ref();
        let given = [
            stage.validate.is_some(),
            stage.transform.is_some(),
            stage.filter.is_some(),
            stage.stage.is_some(),
        ]
        .iter()
        .filter(|&&g| g)
        .count();
        if given != 1 {
            self.problem(
                at,
                format!(
                    "{pipeline} stage {}: give exactly one of validate, transform, filter or stage",
                    index + 1
                ),
            );
            return None;
        }
        if stage.split.is_some() && stage.transform.is_none() {
            self.problem(
                at,
                format!(
                    "{pipeline} stage {}: `split` belongs to a transform",
                    index + 1
                ),
            );
        }
        let (kind_name, kind) = if let Some(path) = &stage.validate {
            (
                "validate",
                self.schema(path, &format!("{pipeline} stage {}", index + 1))
                    .map(StageKind::Validate),
            )
        } else if let Some(code) = &stage.transform {
            let what = format!("{pipeline} stage {} (transform)", index + 1);
            (
                "transform",
                self.program(code, &what)
                    .map(|program| StageKind::Transform {
                        program,
                        split: stage.split.unwrap_or(false),
                    }),
            )
        } else if let Some(code) = &stage.filter {
            let what = format!("{pipeline} stage {} (filter)", index + 1);
            ("filter", self.program(code, &what).map(StageKind::Filter))
        } else {
            let spec = stage.stage.as_ref().expect("one kind is given");
            match spec.get_ref().parse::<Shorthand>() {
                Ok(shorthand) => (shorthand.kind(), Some(StageKind::Shorthand(shorthand))),
                Err(error) => {
                    self.problem(
                        spec.span().start,
                        format!("{pipeline} stage {}: {error}", index + 1),
                    );
                    ("stage", None)
                }
            }
        };
        let name = stage
            .name
            .clone()
            .unwrap_or_else(|| format!("{}-{kind_name}", index + 1));
        if !is_name(&name) {
            self.problem(
                at,
                format!("{pipeline}: stage name '{name}' is not a name ({NAME_RULE})"),
            );
        } else if names.contains(&name) {
            self.problem(at, format!("{pipeline}: two stages are named '{name}'"));
        }
        names.push(name.clone());
        Some(Stage {
            name: name.into(),
            kind: kind?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, Problems> {
        Config::parse(Path::new("conveyor.toml"), text)
    }

    #[test]
    fn a_jq_syntax_error_is_placed_in_the_file() {
        let problems =
            parse("[[pipelines]]\nname = \"p\"\nstages = [\n  { transform = '.a | | .b' },\n]\n")
                .expect_err("bad jq");
        assert_eq!(problems.0.len(), 1, "{problems}");
        let problem = &problems.0[0];
        assert_eq!((problem.line, problem.column), (4, 23), "{problem}");
        assert!(
            problem.message.contains("pipeline p stage 1 (transform)"),
            "{problem}"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let problems = parse(
            r#"
[sinks.warehouse]
type = "file"
path = "out.ndjson"

[[pipelines]]
name = "p"
match = ".source |"
stages = [ { filter = "true", transform = "." }, { stage = "frobnicate" } ]
route = [ { to = ["nowhere"] } ]
"#,
        )
        .expect_err("several problems");
        let text = problems.to_string();
        assert_eq!(problems.0.len(), 4, "{text}");
        assert!(text.contains("conveyor.toml:8:"), "{text}");
        assert!(text.contains("exactly one of"), "{text}");
        assert!(text.contains("frobnicate"), "{text}");
        assert!(text.contains("no sink named 'nowhere'"), "{text}");
    }

    #[test]
    fn names_are_identifiers_and_unique() {
        let problems = parse(
            "[[pipelines]]\nname = \"a b\"\n\n[[pipelines]]\nname = \"p\"\n\n[[pipelines]]\nname = \"p\"\n",
        )
        .expect_err("bad names");
        let text = problems.to_string();
        assert!(text.contains("'a b' is not a name"), "{text}");
        assert!(text.contains("two pipelines are named 'p'"), "{text}");
    }

    #[test]
    fn an_unknown_key_is_an_error_not_ignored() {
        let problems = parse("[[pipelines]]\nname = \"p\"\nstagez = []\n").expect_err("typo");
        assert!(problems.to_string().contains("stagez"), "{problems}");
        assert_eq!(problems.0[0].line, 3, "{problems}");
    }

    #[test]
    fn a_good_file_loads_with_defaults() {
        let config = parse(
            r#"
[defaults]
route = ["warehouse"]
budget = { steps = 50, time_ms = 10, outputs = 3 }

[sinks.warehouse]
type = "file"
path = "w.ndjson"

[[pipelines]]
name = "sensors"
match = '.source | startswith("sensor-")'
stages = [
  { transform = '.data.c = 1' },
  { filter = '.data.c > 0', name = "positive" },
]
route = [ { when = '.data.c > 40', to = ["default", "warehouse"] }, { to = ["warehouse"] } ]
"#,
        )
        .expect("valid");
        assert_eq!(config.sinks.len(), 1);
        assert_eq!(config.sinks[0].settings["path"], "w.ndjson");
        let pipeline = &config.pipelines.pipelines[0];
        let names: Vec<&str> = pipeline.stages.iter().map(|s| &*s.name).collect();
        assert_eq!(names, ["1-transform", "positive"]);
        assert_eq!(&*config.pipelines.default_route, [Arc::from("warehouse")]);
        assert_eq!(config.pipelines.budget.steps, 50);
        assert_eq!(config.pipelines.sink_names().len(), 2);
    }
}
