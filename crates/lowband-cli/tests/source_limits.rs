//! The house stays in order: no source file over 600 lines and no function over 80, outside
//! tests (`#[cfg(test)]` modules and `tests/` directories), in every crate of the workspace.
//! A function is counted from its `fn` line to its closing brace (doc comments not included).

use std::path::{Path, PathBuf};

const FILE_LINES_MAX: usize = 600;
const FUNCTION_LINES_MAX: usize = 80;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The lines before a file's `#[cfg(test)]` module.
fn code_lines(text: &str) -> Vec<&str> {
    text.lines()
        .take_while(|l| l.trim() != "#[cfg(test)]")
        .collect()
}

fn is_fn_start(line: &str) -> bool {
    let t = line.trim_start();
    let t = t
        .strip_prefix("pub(crate) ")
        .or_else(|| t.strip_prefix("pub(super) "))
        .or_else(|| t.strip_prefix("pub "))
        .unwrap_or(t);
    let t = t.strip_prefix("async ").unwrap_or(t);
    let t = t.strip_prefix("const ").unwrap_or(t);
    let t = t.strip_prefix("unsafe ").unwrap_or(t);
    t.starts_with("fn ")
}

/// (name line, length) of every function body; braces in strings and comments are rare enough in
/// this codebase's signatures not to matter, and a miscount only ever errs long.
fn functions(lines: &[&str]) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    for (start, line) in lines.iter().enumerate() {
        if !is_fn_start(line) {
            continue;
        }
        let (mut depth, mut opened) = (0i64, false);
        for (offset, body) in lines[start..].iter().enumerate() {
            for c in body.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            if !opened && body.trim_end().ends_with(';') {
                break; // a declaration (a trait's method), no body
            }
            if opened && depth == 0 {
                found.push((start + 1, offset + 1));
                break;
            }
        }
    }
    found
}

#[test]
fn no_source_file_over_600_lines_and_no_function_over_80() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&crates).unwrap().flatten() {
        let src = entry.path().join("src");
        if src.is_dir() {
            sources(&src, &mut files);
        }
    }
    assert!(files.len() > 50, "only {} source files found", files.len());
    let mut over = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let lines = code_lines(&text);
        if lines.len() > FILE_LINES_MAX {
            over.push(format!("{}: {} lines", file.display(), lines.len()));
        }
        for (line, length) in functions(&lines) {
            if length > FUNCTION_LINES_MAX {
                over.push(format!(
                    "{}:{line}: a function of {length} lines",
                    file.display()
                ));
            }
        }
    }
    assert!(
        over.is_empty(),
        "over the limits ({FILE_LINES_MAX} lines a file, {FUNCTION_LINES_MAX} a function):\n{}",
        over.join("\n")
    );
}

#[test]
fn the_counter_sees_a_long_function() {
    let long = format!("fn f() {{\n{}}}\n", "    x();\n".repeat(90));
    let lines: Vec<&str> = long.lines().collect();
    assert_eq!(functions(&lines), vec![(1, 92)]);
    let declaration = ["    fn g(&self) -> u32;", "fn h() {", "}"];
    assert_eq!(functions(&declaration), vec![(2, 2)]);
}
