//! Enums the outside world reads by name: a metric's label values, a
//! command-line value, a log field, a line of the docs. Each such enum is
//! declared with [`crate::labelled!`] from one table, a row per value: the variant,
//! its label (and any alias a user may type) and a line of help.
//!
//! Why: the labels used to be typed again in `ALL`, in `label()`, in a
//! `FromStr` whose error listed them, in clap's value names and in the
//! metrics' help, and they drifted (a failure cause missing from its
//! metric's help). From one table, a value cannot be added without its
//! label and help, the parse error and clap's possible values list what
//! the table lists, and arrays indexed by the enum are sized by `ALL.len()`.
//!
//! The module imports nothing of the engine; the modules that declare such
//! an enum use the macro by its name (`#[macro_use]` in lib.rs), and the
//! code it writes names this module's items by `$crate::labels::`.

/// A value given for a labelled enum that none of its labels names.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{given}`; expected {}", one_of(expected))]
pub struct UnknownLabel {
    /// What the enum is called in a sentence ("backend", "data path").
    pub what: &'static str,
    pub given: String,
    pub expected: &'static [&'static str],
}

/// What an app needs to offer a labelled enum's values (clap's possible
/// values, a docs check): every value in order, its label, aliases and help.
pub trait Labelled: Copy + 'static {
    /// What the enum is called in a sentence.
    const WHAT: &'static str;
    /// Every value, in the table's order.
    const VALUES: &'static [Self];
    /// Every value's label, in the same order.
    const LABELS: &'static [&'static str];

    fn label(self) -> &'static str;
    /// Other names a user may type for the value.
    fn aliases(self) -> &'static [&'static str];
    /// What the value means, in a line.
    fn help(self) -> &'static str;
}

/// The value of `T` that `text` names, by label or alias.
pub fn parse<T: Labelled>(text: &str) -> Result<T, UnknownLabel> {
    T::VALUES
        .iter()
        .copied()
        .find(|value| value.label() == text || value.aliases().contains(&text))
        .ok_or_else(|| UnknownLabel { what: T::WHAT, given: text.to_string(), expected: T::LABELS })
}

/// `["a", "b", "c"]` as a user reads it: "a, b or c".
pub fn one_of(labels: &[&str]) -> String {
    match labels {
        [] => String::new(),
        [only] => (*only).to_string(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// Declares an enum from a table of its values, a row each:
/// `Variant = "label" | "alias"..., "help";` (the help is the variant's
/// doc; doc comments above a row add to it);
/// a variant with fields gives each a type and the value `ALL` holds:
/// `Sni { port: u16 = 443 } = "sni", "help";`. Writes the enum (`Clone,
/// Copy, Debug, PartialEq, Eq`, plus the derives given), `ALL` and
/// `LABELS` (in the table's order: for a fieldless enum `value as usize`
/// indexes both), `label()`, `help()`, [`Labelled`] and `FromStr` (whose
/// error is an [`UnknownLabel`] listing the labels).
#[macro_export]
macro_rules! labelled {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident as $what:literal {
            $(
                $(#[$row_meta:meta])*
                $variant:ident $({ $($field:ident : $type:ty = $value:expr),* })?
                    = $label:literal $(| $alias:literal)*, $help:literal;
            )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        $vis enum $name {
            $( #[doc = $help] $(#[$row_meta])* $variant $({ $($field: $type),* })?, )+
        }

        impl $name {
            /// Every value, in the table's order.
            pub const ALL: [$name; [$($label),+].len()] = [$($name::$variant { $($($field: $value),*)? }),+];
            /// Every value's label, in the same order.
            pub const LABELS: [&'static str; [$($label),+].len()] = [$($label),+];

            /// The value's name in metrics, logs, docs and on the command line.
            pub const fn label(self) -> &'static str {
                match self {
                    $($name::$variant { .. } => $label,)+
                }
            }

            /// What the value means, in a line (a metric's help, `--help`).
            pub const fn help(self) -> &'static str {
                match self {
                    $($name::$variant { .. } => $help,)+
                }
            }
        }

        impl $crate::labels::Labelled for $name {
            const WHAT: &'static str = $what;
            const VALUES: &'static [$name] = &$name::ALL;
            const LABELS: &'static [&'static str] = &$name::LABELS;

            fn label(self) -> &'static str {
                $name::label(self)
            }

            fn aliases(self) -> &'static [&'static str] {
                match self {
                    $($name::$variant { .. } => &[$($alias),*],)+
                }
            }

            fn help(self) -> &'static str {
                $name::help(self)
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = $crate::labels::UnknownLabel;

            fn from_str(text: &str) -> Result<Self, Self::Err> {
                $crate::labels::parse(text)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    labelled! {
        /// A test enum.
        enum Colour as "colour" {
            Red = "red" | "crimson", "warm";
            /// A documented row.
            Blue = "blue", "cold";
            Mixed { red: u8 = 1, blue: u8 = 2 } = "mixed", "some of each";
        }
    }

    #[test]
    fn one_table_gives_labels_help_and_parse() {
        assert_eq!(Colour::ALL, [Colour::Red, Colour::Blue, Colour::Mixed { red: 1, blue: 2 }]);
        assert_eq!(Colour::LABELS, ["red", "blue", "mixed"]);
        assert_eq!((Colour::Blue.label(), Colour::Blue.help()), ("blue", "cold"));
        assert_eq!("crimson".parse(), Ok(Colour::Red));
        assert_eq!("mixed".parse(), Ok(Colour::Mixed { red: 1, blue: 2 }));
        assert_eq!(Colour::Mixed { red: 0, blue: 0 }.label(), "mixed");
        let error = "green".parse::<Colour>().unwrap_err();
        assert_eq!(error.to_string(), "unknown colour `green`; expected red, blue or mixed");
    }

    #[test]
    fn lists_read_as_a_sentence() {
        assert_eq!(one_of(&["a"]), "a");
        assert_eq!(one_of(&["a", "b", "c"]), "a, b or c");
    }
}
