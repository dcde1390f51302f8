package mediator

import (
	"testing"
	"unsafe"
)

type tableTestEntry struct{ n int }

func (e *tableTestEntry) base() *meta             { return nil }
func (e *tableTestEntry) build(s *snapshot) entry { return e }

func TestTypeTable(t *testing.T) {
	for _, n := range []int{0, 1, 2, 3, 7, 8, 9, 100, 1000} {
		keys := make([]*[16]byte, n) // distinct addresses, 16-byte aligned like type descriptors
		entries := map[unsafe.Pointer]entry{}
		for i := range keys {
			keys[i] = new([16]byte)
			entries[unsafe.Pointer(keys[i])] = &tableTestEntry{n: i}
		}
		tab := newTypeTable(entries)
		if len(entries) > 0 && len(tab.slots) < 2*len(entries) {
			t.Errorf("n=%d: %d slots, want at least %d", n, len(tab.slots), 2*len(entries))
		}
		for i, k := range keys {
			e, ok := tab.lookup(unsafe.Pointer(k)).(*tableTestEntry)
			if !ok || e.n != i {
				t.Fatalf("n=%d: lookup(key %d) = %v", n, i, e)
			}
		}
		for range 100 {
			if e := tab.lookup(unsafe.Pointer(new([16]byte))); e != nil {
				t.Fatalf("n=%d: lookup of an absent key = %v", n, e)
			}
		}
	}
	var empty typeTable
	if e := empty.lookup(unsafe.Pointer(new(int))); e != nil {
		t.Fatalf("empty table: %v", e)
	}
}
