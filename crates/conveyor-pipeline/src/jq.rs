//! jq programs, through jaq: compiled once (at start-up or reload), run per event with a bound
//! on the work one run may do.
//!
//! The bound. jaq has no step counter of its own, and a program that never returns would hold
//! a worker for good (`repeat`, `range(1e18)`) or grow without limit (`[repeat(1)]`). Every
//! generator of the standard library that can run on without end (`repeat`, `recurse`,
//! `while`, `until`, `range`) is redefined here to pass through `__conveyor_step` on each
//! round; the step counts against the run's [`Budget`] (steps and wall time) and fails the run
//! once it is spent, also when the program catches the error (`try`): a spent budget fails the
//! run whatever it printed afterwards. The outputs of one run are capped too. What this does
//! not bound is a recursive `def` of the user's own that calls none of those generators; such
//! a program is refused by nothing here, and docs/PIPELINES.md says so.

use std::cell::Cell;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jaq_core::load::{Arena, File, Loader};
use jaq_core::{Ctx, Vars, data, unwrap_valr};
use jaq_json::Val;

type Data = data::JustLut<Val>;

/// What one run of one program on one event may spend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Rounds of the standard library's generators (`repeat`, `range`, ...).
    pub steps: u64,
    /// Wall time of the run, checked at each step.
    pub time: Duration,
    /// Outputs of the run.
    pub outputs: usize,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            steps: 1_000_000,
            time: Duration::from_millis(100),
            outputs: 1_000,
        }
    }
}

/// A jq program that did not compile: where (a byte offset into the program) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileError {
    pub offset: usize,
    pub message: String,
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (at byte {})", self.message, self.offset)
    }
}

/// A compiled jq program. Cheap to clone; `Send + Sync`, so a pipeline can run on any thread.
#[derive(Clone)]
pub struct Program {
    filter: Arc<jaq_core::Filter<Data>>,
    code: Arc<str>,
}

impl fmt::Debug for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "jq({:?})", self.code)
    }
}

/// The generators that can run without end, each passing `__conveyor_step` once per round.
/// Later definitions shadow the standard library's.
const BOUNDED_GENERATORS: &str = r#"
def repeat(f): def rec: f, (__conveyor_step | rec); rec;
def recurse(f): def rec: ., (f | __conveyor_step | rec); rec;
def recurse: recurse(.[]?);
def recurse(f; cond): recurse(f | select(cond));
def while(cond; update): def rec: if cond then ., (update | __conveyor_step | rec) else empty end; rec;
def until(cond; update): def rec: if cond then . else update | __conveyor_step | rec end; rec;
def range($from; $to): range($from; $to; 1) | __conveyor_step;
def range($to): range(0; $to);
"#;

thread_local! {
    /// The budget of the run in progress on this thread: steps left, deadline, and whether it
    /// was spent (stays set until the run ends, so a `try` cannot hide it).
    static RUN: Cell<Option<RunState>> = const { Cell::new(None) };
}

#[derive(Debug, Clone, Copy)]
struct RunState {
    steps_left: u64,
    deadline: Instant,
    spent: Option<Spent>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spent {
    Steps,
    Time,
}

fn step_fun() -> jaq_core::native::Fun<Data> {
    jaq_core::native::run(("__conveyor_step", jaq_core::native::v(0), |cv| {
        let spent = RUN.with(|run| {
            let mut state = run.get()?;
            if state.spent.is_none() {
                if state.steps_left == 0 {
                    state.spent = Some(Spent::Steps);
                } else {
                    state.steps_left -= 1;
                    // The clock is read every 256 steps: cheap, and fine-grained enough.
                    if state.steps_left % 256 == 0 && Instant::now() > state.deadline {
                        state.spent = Some(Spent::Time);
                    }
                }
                run.set(Some(state));
            }
            state.spent
        });
        match spent {
            None => jaq_core::native::bome(Ok(cv.1)),
            Some(_) => jaq_core::native::bome(Err(jaq_core::Error::str(
                "conveyor: the program's work budget is spent",
            ))),
        }
    }))
}

impl Program {
    /// Parses and compiles `code` with jq's standard library (jaq's), bounded generators.
    pub fn compile(code: &str) -> Result<Self, CompileError> {
        let arena = Arena::default();
        let bounded = jaq_core::load::parse(BOUNDED_GENERATORS, |p| p.defs())
            .expect("the bounded generators parse");
        let defs = jaq_core::defs()
            .chain(jaq_std::defs())
            .chain(jaq_json::defs())
            .chain(bounded);
        let funs = jaq_core::funs()
            .chain(jaq_std::funs())
            .chain(jaq_json::funs())
            .chain(std::iter::once(step_fun()));
        let loader = Loader::new(defs);
        let modules = loader
            .load(&arena, File { code, path: () })
            .map_err(|errors| load_error(code, errors))?;
        let filter = jaq_core::Compiler::default()
            .with_funs(funs)
            .compile(modules)
            .map_err(|errors| {
                let (name, undefined) = errors
                    .into_iter()
                    .flat_map(|(_, errs)| errs)
                    .next()
                    .expect("a failed compile reports an error");
                CompileError {
                    offset: offset_in(code, name),
                    message: format!("undefined {} '{name}'", undefined.as_str()),
                }
            })?;
        Ok(Program {
            filter: Arc::new(filter),
            code: code.into(),
        })
    }

    pub fn code(&self) -> &str {
        &self.code
    }

    /// Runs the program on `input`; every output, or why the run failed (an error the program
    /// raised, or its budget spent).
    pub fn run(&self, input: Val, budget: &Budget) -> Result<Vec<Val>, String> {
        self.budgeted(input, budget, |outputs| {
            let mut kept = Vec::new();
            for output in outputs {
                let value = output.map_err(|error| format!("jq error: {error}"))?;
                if kept.len() == budget.outputs {
                    return Err(format!(
                        "the program gave more than {} outputs",
                        budget.outputs
                    ));
                }
                kept.push(value);
            }
            Ok(kept)
        })
    }

    /// Runs the program as a predicate: its first output, read as jq reads a condition (false
    /// and null are false); no output is false. The outputs after the first are not computed.
    pub fn test(&self, input: Val, budget: &Budget) -> Result<bool, String> {
        self.budgeted(input, budget, |outputs| match outputs.next() {
            None => Ok(false),
            Some(Ok(value)) => Ok(jaq_core::ValT::as_bool(&value)),
            Some(Err(error)) => Err(format!("jq error: {error}")),
        })
    }

    /// Runs the program on `input` under `budget`, handing its outputs to `take`; a spent
    /// budget fails the run whatever `take` made of them.
    fn budgeted<T>(
        &self,
        input: Val,
        budget: &Budget,
        take: impl FnOnce(&mut dyn Iterator<Item = jaq_core::ValR<Val>>) -> Result<T, String>,
    ) -> Result<T, String> {
        let previous = RUN.replace(Some(RunState {
            steps_left: budget.steps,
            deadline: Instant::now() + budget.time,
            spent: None,
        }));
        let ctx = Ctx::<Data>::new(&self.filter.lut, Vars::new([]));
        let result = take(&mut self.filter.id.run((ctx, input)).map(unwrap_valr));
        let state = RUN.replace(previous);
        match state.and_then(|s| s.spent) {
            Some(Spent::Steps) => Err(format!(
                "the program ran more than {} generator steps (repeat, range, recurse, ...)",
                budget.steps
            )),
            Some(Spent::Time) => Err(format!(
                "the program ran longer than its budget of {:?}",
                budget.time
            )),
            None => result,
        }
    }
}

/// Where `part` (a slice of `whole`, as jaq's errors hold them) starts in `whole`.
fn offset_in(whole: &str, part: &str) -> usize {
    let start = part.as_ptr() as usize;
    let base = whole.as_ptr() as usize;
    if start >= base && start <= base + whole.len() {
        start - base
    } else {
        0
    }
}

fn load_error(code: &str, errors: jaq_core::load::Errors<&str, ()>) -> CompileError {
    use jaq_core::load::Error;
    let Some((_, error)) = errors.into_iter().next() else {
        return CompileError {
            offset: 0,
            message: "the program does not load".into(),
        };
    };
    match error {
        Error::Io(errs) => {
            let (path, why) = errs.into_iter().next().unwrap_or(("", String::new()));
            CompileError {
                offset: offset_in(code, path),
                message: format!("cannot import '{path}': {why} (modules are not supported)"),
            }
        }
        Error::Lex(errs) => {
            let (expect, at) = errs.into_iter().next().expect("a lex error");
            CompileError {
                offset: offset_in(code, at),
                message: format!("expected {}", expect.as_str()),
            }
        }
        Error::Parse(errs) => {
            let (expect, at) = errs.into_iter().next().expect("a parse error");
            let found = if at.is_empty() {
                "the end of the program".to_owned()
            } else {
                format!("'{}'", at.chars().take(20).collect::<String>())
            };
            CompileError {
                offset: offset_in(code, at),
                message: format!("expected {}, found {found}", expect.as_str()),
            }
        }
    }
}

/// Parses JSON into a jq value.
pub fn parse_json(bytes: &[u8]) -> Result<Val, String> {
    jaq_json::read::parse_single(bytes).map_err(|e| format!("not JSON: {e}"))
}

/// Writes a jq value as compact JSON.
pub fn write_json(out: &mut Vec<u8>, value: &Val) {
    jaq_json::write::write(out, &jaq_json::write::Pp::default(), 0, value)
        .expect("writing to a Vec cannot fail");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(code: &str, input: &str) -> Result<Vec<String>, String> {
        let program = Program::compile(code).map_err(|e| e.to_string())?;
        let outputs = program.run(parse_json(input.as_bytes())?, &Budget::default())?;
        Ok(outputs
            .iter()
            .map(|v| {
                let mut out = Vec::new();
                write_json(&mut out, v);
                String::from_utf8(out).expect("utf-8")
            })
            .collect())
    }

    #[test]
    fn a_program_runs_with_the_standard_library() {
        assert_eq!(
            run(
                ".a |= . + 1 | del(.b) | .c = (.d | map(. * 2))",
                r#"{"a":1,"b":2,"d":[1,2]}"#
            ),
            Ok(vec![r#"{"a":2,"d":[1,2],"c":[2,4]}"#.to_owned()])
        );
        assert_eq!(run(".[]", "[1,2]"), Ok(vec!["1".into(), "2".into()]));
        assert_eq!(run("empty", "1"), Ok(vec![]));
        assert_eq!(
            run(r#".s | test("^sen")"#, r#"{"s":"sensor"}"#),
            Ok(vec!["true".into()])
        );
    }

    #[test]
    fn a_syntax_error_names_its_position() {
        let error = Program::compile(".a | | .b").expect_err("bad syntax");
        assert_eq!(error.offset, 5, "{error}");
        let error = Program::compile(".a | frobnicate").expect_err("undefined");
        assert_eq!(error.offset, 5, "{error}");
        assert!(error.message.contains("frobnicate"), "{error}");
        let error = Program::compile("(.a").expect_err("unclosed");
        assert!(error.message.contains("closing parenthesis"), "{error}");
    }

    #[test]
    fn a_runaway_program_is_stopped_with_a_reason() {
        let budget = Budget {
            steps: 10_000,
            time: Duration::from_secs(5),
            outputs: 10,
        };
        for code in [
            "[repeat(1)]",
            "last(range(1e18))",
            "[recurse(. + 1)] | length",
            "try [repeat(1)] catch 0",
            "until(false; .)",
        ] {
            let program = Program::compile(code).expect("compiles");
            let error = program
                .run(Val::from(0usize), &budget)
                .expect_err("stopped");
            assert!(error.contains("10000 generator steps"), "{code}: {error}");
        }
        let program = Program::compile("range(100)").expect("compiles");
        let error = program.run(Val::Null, &budget).expect_err("too many");
        assert!(error.contains("more than 10 outputs"), "{error}");
    }

    #[test]
    fn a_long_program_is_stopped_by_time() {
        let budget = Budget {
            steps: u64::MAX,
            time: Duration::from_millis(20),
            outputs: 10,
        };
        let program = Program::compile("last(range(1e18))").expect("compiles");
        let error = program.run(Val::Null, &budget).expect_err("stopped");
        assert!(error.contains("longer than"), "{error}");
    }

    #[test]
    fn a_predicate_reads_its_first_output() {
        let budget = Budget::default();
        let program = Program::compile(".x > 1").expect("compiles");
        assert_eq!(
            program.test(parse_json(br#"{"x":2}"#).expect("json"), &budget),
            Ok(true)
        );
        assert_eq!(
            program.test(parse_json(br#"{"x":0}"#).expect("json"), &budget),
            Ok(false)
        );
        let empty = Program::compile("empty").expect("compiles");
        assert_eq!(empty.test(Val::Null, &budget), Ok(false));
        let endless = Program::compile("repeat(true)").expect("compiles");
        assert_eq!(endless.test(Val::Null, &budget), Ok(true));
    }
}
