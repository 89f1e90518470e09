//! Closed sets of named values (`method: maml`, `dtype: f32`, ...): one macro
//! gives each enum its names, parsing with an error that lists what is allowed,
//! and YAML (de)serialization by name.

use std::fmt;

/// A name that is not one of the allowed values of a configuration choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownValue {
    value: String,
    allowed: String,
}

impl UnknownValue {
    pub(crate) fn new<'a>(value: &str, allowed: impl IntoIterator<Item = &'a str>) -> Self {
        UnknownValue {
            value: value.to_owned(),
            allowed: join(allowed),
        }
    }
}

impl fmt::Display for UnknownValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown value `{}`; allowed: {}",
            self.value, self.allowed
        )
    }
}

impl std::error::Error for UnknownValue {}

/// `a, b, c`: the form used in every message that lists allowed names.
pub(crate) fn join<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    names.into_iter().collect::<Vec<_>>().join(", ")
}

/// Declares a `Copy` enum whose variants are written in YAML and on the
/// command line by the given names.
macro_rules! choice_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal, )+
        }
        default = $default:ident;
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every value, in the order of the documentation.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The name written in configuration files and on the command line.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::$default
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = $crate::config::UnknownValue;

            fn from_str(s: &str) -> ::std::result::Result<Self, Self::Err> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| {
                        $crate::config::UnknownValue::new(s, Self::ALL.iter().map(|v| v.as_str()))
                    })
            }
        }

        impl ::serde::Serialize for $name {
            fn serialize<S: ::serde::Serializer>(
                &self,
                serializer: S,
            ) -> ::std::result::Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(
                deserializer: D,
            ) -> ::std::result::Result<Self, D::Error> {
                struct NameVisitor;

                impl ::serde::de::Visitor<'_> for NameVisitor {
                    type Value = $name;

                    fn expecting(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                        write!(
                            f,
                            "one of {}",
                            $crate::config::choice::join($name::ALL.iter().map(|v| v.as_str()))
                        )
                    }

                    fn visit_str<E: ::serde::de::Error>(
                        self,
                        v: &str,
                    ) -> ::std::result::Result<$name, E> {
                        v.parse().map_err(E::custom)
                    }
                }

                deserializer.deserialize_str(NameVisitor)
            }
        }
    };
}

pub(crate) use choice_enum;
