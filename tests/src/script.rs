//! Building blocks for tests that run a generated shell script (usually inside the
//! lab) and read its output back in named sections.
//!
//! A script prints `=== BEGIN name`, the section's output, then
//! `=== END name rc=N`; [`section`] and [`section_exit_code`] take it apart.

use std::path::Path;

/// Quote for POSIX sh: everything inside single quotes, `'` as `'\''`.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Quote every word and join them into one command line.
pub fn sh_command<S: AsRef<str>>(argv: &[S]) -> String {
    argv.iter()
        .map(|a| sh_quote(a.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Script lines that run `command` as section `name` with its exit code recorded.
pub fn sh_section(name: &str, command: &str) -> String {
    format!("echo '=== BEGIN {name}'\n{command}\necho \"=== END {name} rc=$?\"\n")
}

/// The text between `=== BEGIN name` and `=== END name`.
pub fn section<'a>(output: &'a str, name: &str) -> Option<&'a str> {
    let begin = format!("=== BEGIN {name}\n");
    let start = output.find(&begin)? + begin.len();
    let end = start + output[start..].find(&format!("=== END {name}"))?;
    Some(&output[start..end])
}

/// The `rc=N` on the section's END line.
pub fn section_exit_code(output: &str, name: &str) -> Option<i32> {
    let marker = format!("=== END {name} rc=");
    let rest = &output[output.find(&marker)? + marker.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// `qemu-system-x86_64 -M microvm` with KVM, serial on stdio, `-no-reboot`: the
/// reference VM the tests compare ours against. Add devices after it.
pub fn qemu_microvm_argv(
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    cpus: u8,
    memory_mib: u64,
) -> Vec<String> {
    let mut argv: Vec<String> = [
        "qemu-system-x86_64",
        "-M",
        "microvm",
        "-enable-kvm",
        "-cpu",
        "host",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.extend([
        "-smp".into(),
        cpus.to_string(),
        "-m".into(),
        memory_mib.to_string(),
        "-kernel".into(),
        kernel.display().to_string(),
        "-initrd".into(),
        initrd.display().to_string(),
        "-append".into(),
        cmdline.to_string(),
    ]);
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_round_trip() {
        let out = format!(
            "noise\n{}{}",
            "=== BEGIN a\nhello\n=== END a rc=3\n", "=== BEGIN b\n=== END b rc=0\n"
        );
        assert_eq!(section(&out, "a"), Some("hello\n"));
        assert_eq!(section_exit_code(&out, "a"), Some(3));
        assert_eq!(section(&out, "b"), Some(""));
        assert_eq!(section_exit_code(&out, "b"), Some(0));
        assert_eq!(section(&out, "c"), None);
        assert!(sh_section("x", "true").contains("=== END x rc=$?"));
    }

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_command(&["a b", "c"]), "'a b' 'c'");
        let argv = qemu_microvm_argv(Path::new("/k"), Path::new("/i"), "x y", 2, 256);
        assert_eq!(argv[0], "qemu-system-x86_64");
        assert!(argv.windows(2).any(|w| w[0] == "-append" && w[1] == "x y"));
        assert!(argv.windows(2).any(|w| w[0] == "-smp" && w[1] == "2"));
    }
}
