package closing

import (
	"sync"
	"testing"
	"time"
)

func TestWaitReturnsWhenDone(t *testing.T) {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { time.Sleep(10 * time.Millisecond); wg.Done() }()
	gaveUp := false
	Wait(&wg, time.Minute, func() { gaveUp = true })
	if gaveUp {
		t.Fatal("gave up although the wait group finished in time")
	}
}

func TestWaitGivesUpThenWaits(t *testing.T) {
	var wg sync.WaitGroup
	abandon := make(chan struct{})
	wg.Add(1)
	go func() { <-abandon; wg.Done() }() // ends only when given up
	Wait(&wg, 10*time.Millisecond, func() { close(abandon) })
	select {
	case <-abandon:
	default:
		t.Fatal("Wait returned without giving up")
	}
}
