package mediator

import "unsafe"

// typeTable maps a type's key (typeKey) to its entry. It is what Send,
// Publish and SendStream read on every call, so it trades a Go map's
// generality for speed: it is built once per registry change, never
// modified afterwards, and a lookup is a multiply, a shift and, almost
// always, one comparison (open addressing with linear probing, at most half
// full).
type typeTable struct {
	slots []typeSlot
	shift uint // 64 - log2(len(slots))
}

type typeSlot struct {
	key unsafe.Pointer
	e   entry
}

// newTypeTable builds the table of entries.
func newTypeTable(entries map[unsafe.Pointer]entry) typeTable {
	bits := uint(1)
	for 1<<bits < 2*len(entries) {
		bits++
	}
	t := typeTable{slots: make([]typeSlot, 1<<bits), shift: 64 - bits}
	mask := uintptr(len(t.slots) - 1)
	for k, e := range entries {
		i := t.index(k)
		for t.slots[i].key != nil {
			i = (i + 1) & mask
		}
		t.slots[i] = typeSlot{key: k, e: e}
	}
	return t
}

// index is the home slot of key: Fibonacci hashing of the type's address.
func (t *typeTable) index(key unsafe.Pointer) uintptr {
	return uintptr(uint64(uintptr(key))*0x9E3779B97F4A7C15) >> t.shift
}

// lookup returns key's entry, or nil.
func (t *typeTable) lookup(key unsafe.Pointer) entry {
	if len(t.slots) == 0 {
		return nil
	}
	mask := uintptr(len(t.slots) - 1)
	for i := t.index(key); ; i = (i + 1) & mask {
		s := &t.slots[i]
		if s.key == key {
			return s.e
		}
		if s.key == nil {
			return nil
		}
	}
}
