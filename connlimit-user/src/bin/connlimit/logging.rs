//! Log lines on stderr, as text for people or JSON objects for log
//! shippers; the format can change while connlimit runs (`serve` applies a
//! changed `[log] format` on SIGHUP).

use std::{
    fmt,
    sync::atomic::{AtomicBool, Ordering},
};

use serde_json::Value;
use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
};
use tracing_subscriber::{
    EnvFilter,
    fmt::{
        FmtContext, FormatEvent, FormatFields,
        format::{Format, Full, Writer},
        time::{FormatTime, SystemTime},
    },
    registry::LookupSpan,
};

use crate::cli::LogFormat;

/// Whether lines are JSON now.
static JSON: AtomicBool = AtomicBool::new(false);
/// Whether `--log-format` chose the format (then the file does not).
static FROM_COMMAND_LINE: AtomicBool = AtomicBool::new(false);

/// Starts logging in `format`; `from_command_line` if `--log-format` chose it.
pub fn init(format: LogFormat, from_command_line: bool) {
    JSON.store(format == LogFormat::Json, Ordering::Relaxed);
    FROM_COMMAND_LINE.store(from_command_line, Ordering::Relaxed);
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("CONNLIMIT_LOG").unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .event_format(Lines { text: Format::default().with_target(false) })
        .init();
}

/// Whether log lines are JSON objects now.
pub fn is_json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// `serve`, on reading its file: the file's `[log] format` (text if it
/// names none), unless `--log-format` chose one.
pub fn apply_file_format(format: Option<LogFormat>) {
    let json = format == Some(LogFormat::Json);
    if json == is_json() {
        return;
    }
    if FROM_COMMAND_LINE.load(Ordering::Relaxed) {
        if format.is_some() {
            tracing::warn!("the service file's [log] format is ignored: --log-format on the command line chose one");
        }
        return;
    }
    JSON.store(json, Ordering::Relaxed);
    tracing::info!(format = if json { "json" } else { "text" }, "log format changed, as the service file says");
}

/// An error that ends connlimit: one line on stderr, as the log lines are.
pub fn fatal(e: &anyhow::Error) {
    if is_json() {
        let line = serde_json::json!({
            "timestamp": timestamp(),
            "level": "ERROR",
            "message": format!("connlimit: error: {e:#}"),
            "fatal": true,
        });
        eprintln!("{line}");
    } else {
        eprintln!("connlimit: error: {e:#}");
    }
}

/// Text lines (tracing-subscriber's own format) or JSON objects, as
/// [`JSON`] says at each event.
struct Lines {
    text: Format<Full, SystemTime>,
}

impl<S, N> FormatEvent<S, N> for Lines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        if !is_json() {
            return self.text.format_event(ctx, writer, event);
        }
        writeln!(writer, "{}", json_line(event))
    }
}

fn timestamp() -> String {
    let mut now = String::new();
    let _ = SystemTime.format_time(&mut Writer::new(&mut now));
    now
}

/// One event as a JSON object: `timestamp`, `level`, then its fields at the
/// top level, `message` included.
fn json_line(event: &Event<'_>) -> String {
    let mut fields = JsonFields(vec![
        ("timestamp".to_owned(), Value::String(timestamp())),
        ("level".to_owned(), Value::String(event.metadata().level().to_string())),
    ]);
    event.record(&mut fields);
    let mut line = String::from("{");
    for (i, (key, value)) in fields.0.iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        line.push_str(&Value::String(key.clone()).to_string());
        line.push(':');
        line.push_str(&value.to_string());
    }
    line.push('}');
    line
}

/// An event's fields, in order, as JSON values: numbers and booleans as
/// such, and lists (a field logged with `?` whose value reads as a JSON
/// array, e.g. `ports = ?ports` giving `[80, 443]`) as arrays, not strings.
struct JsonFields(Vec<(String, Value)>);

impl JsonFields {
    fn push(&mut self, field: &Field, value: Value) {
        self.0.push((field.name().to_owned(), value));
    }
}

impl Visit for JsonFields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        let value = match serde_json::from_str::<Value>(&text) {
            Ok(array @ Value::Array(_)) if field.name() != "message" => array,
            _ => Value::String(text),
        };
        self.push(field, value);
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.push(field, Value::String(value.to_owned()));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.push(field, value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.push(field, value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.push(field, value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.push(field, value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.push(field, Value::String(value.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use serde_json::{Value, json};
    use tracing_subscriber::layer::SubscriberExt as _;

    /// The JSON lines `f` logs.
    fn json_lines(f: impl FnOnce()) -> Vec<Value> {
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        super::JSON.store(true, std::sync::atomic::Ordering::Relaxed);
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .event_format(super::Lines { text: Default::default() });
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), f);
        let out = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"))).collect()
    }

    #[test]
    fn json_lines_write_lists_as_arrays_and_numbers_as_numbers() {
        let ports: Vec<u16> = vec![8090, 8091];
        let lines = json_lines(|| {
            tracing::info!(instance = %"web", ports = ?ports, limit = 10u32, persist = false, "connlimit attached");
            tracing::warn!(program_names = ?["tubular"], "[not a list] message");
        });
        assert_eq!(lines.len(), 2);
        let attached = &lines[0];
        assert_eq!(attached["ports"], json!([8090, 8091]));
        assert_eq!((&attached["limit"], &attached["persist"]), (&json!(10), &json!(false)));
        assert_eq!((&attached["instance"], &attached["level"]), (&json!("web"), &json!("INFO")));
        assert_eq!(attached["message"], "connlimit attached");
        assert!(attached["timestamp"].as_str().unwrap().ends_with('Z'), "{attached}");
        assert_eq!(lines[1]["program_names"], json!(["tubular"]));
        // A message is a message, whatever it looks like.
        assert_eq!(lines[1]["message"], "[not a list] message");
    }
}
