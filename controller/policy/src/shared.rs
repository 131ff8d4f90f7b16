//! Values many objects carry, held once. The replicas of a workload carry
//! the same label set; the pods of a namespace its name, the pods of a node
//! the node's; and every table that keys by a pod (the source's, the
//! snapshot's, the compiler's) holds its name. At 150k pods the copies
//! were most of what the agent held.

use std::{borrow::Borrow, fmt, hash::Hash, ops::Deref, sync::Arc};

use foldhash::HashSet;

/// One `Arc` per distinct value seen, handed to whoever brings an equal one.
pub struct Shared<T: ?Sized> {
    values: HashSet<Arc<T>>,
    /// Size after the last sweep of values nobody holds any more.
    swept_at: usize,
}

impl<T: ?Sized> Default for Shared<T> {
    fn default() -> Self {
        Self { values: HashSet::default(), swept_at: 0 }
    }
}

impl<T: ?Sized> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Self { values: self.values.clone(), swept_at: self.swept_at }
    }
}

impl<T: ?Sized> fmt::Debug for Shared<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Shared({} values)", self.values.len())
    }
}

impl<T: ?Sized + Eq + Hash> Shared<T> {
    pub fn share(&mut self, value: Arc<T>) -> Arc<T> {
        if let Some(known) = self.values.get(&value) {
            return known.clone();
        }
        self.values.insert(value.clone());
        // Sweeping when the set has doubled keeps the cost per value constant.
        if self.values.len() > 2 * self.swept_at.max(1024) {
            self.values.retain(|value| Arc::strong_count(value) > 1);
            self.swept_at = self.values.len();
        }
        value
    }
}

/// A name (of a namespace, a pod, a node) whose clones share one text.
/// It compares, hashes, orders and prints, `Debug` included, exactly as the
/// text does, so numbers hashed from names are what they were as `String`s.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(Arc<str>);

impl Name {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// This name, as held by `names` when an equal one is there already.
    pub fn shared(self, names: &mut Shared<str>) -> Self {
        Name(names.share(self.0))
    }
}

impl Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Name {
    fn from(text: &str) -> Self {
        Name(text.into())
    }
}

impl From<String> for Name {
    fn from(text: String) -> Self {
        Name(text.into())
    }
}

impl From<&String> for Name {
    fn from(text: &String) -> Self {
        Name(text.as_str().into())
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for Name {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<Name> for String {
    fn eq(&self, other: &Name) -> bool {
        **self == *other.0
    }
}

impl serde::Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_are_held_once() {
        let mut names = Shared::<str>::default();
        let a = Name::from("ns-1").shared(&mut names);
        let b = Name::from(String::from("ns-1")).shared(&mut names);
        let c = Name::from("ns-2").shared(&mut names);
        assert!(Arc::ptr_eq(&a.0, &b.0));
        assert!(!Arc::ptr_eq(&a.0, &c.0));
        assert_eq!(a, "ns-1");
    }

    #[test]
    fn a_name_hashes_and_prints_as_its_text() {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let name = Name::from("web-0");
        let text = String::from("web-0");
        assert_eq!(format!("{name:?}"), format!("{text:?}"));
        assert_eq!(name.to_string(), text);
        let hasher = BuildHasherDefault::<DefaultHasher>::default();
        assert_eq!(hasher.hash_one(&name), hasher.hash_one(&text));
    }

    #[test]
    fn values_nobody_holds_are_swept() {
        let mut names = Shared::<str>::default();
        let kept = Name::from("kept").shared(&mut names);
        for n in 0..5000 {
            drop(Name::from(format!("gone-{n}")).shared(&mut names));
        }
        assert!(names.values.len() < 3000, "{} values held", names.values.len());
        assert!(Arc::ptr_eq(&Name::from("kept").shared(&mut names).0, &kept.0));
    }
}
