package limiter_test

import (
	"context"
	"fmt"
	"log"
	"time"

	"github.com/portrait-proxy/portrait-proxy/limiter"
)

// A quota of two calls a second: a call takes a slot of the window when it
// is granted and holds it while in flight and for a second after its
// answer; a permit cancelled because no call was made frees its slot at
// once.
func ExampleLocal() {
	l, err := limiter.NewLocal(limiter.Config{Rate: 2, Burst: 2})
	if err != nil {
		log.Fatal(err)
	}
	ctx := context.Background()

	first, _ := l.Acquire(ctx)
	second, _ := l.Acquire(ctx)
	fmt.Println("two calls granted at once (Burst 2)")

	first.Done()    // the call was made and its answer is in: the slot is held a second more
	second.Cancel() // no call was made after all: the slot is free again

	// The third call takes the cancelled slot, after the spacer's half
	// second, well before the answered one's second is over.
	soon, cancel := context.WithTimeout(ctx, 800*time.Millisecond)
	defer cancel()
	third, err := l.Acquire(soon)
	fmt.Println("third call:", err)

	// A fourth finds one slot in flight and one answered under a second ago.
	short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	_, err = l.Acquire(short)
	fmt.Println("fourth call:", err)
	if third != nil {
		third.Done()
	}

	// Output:
	// two calls granted at once (Burst 2)
	// third call: <nil>
	// fourth call: context deadline exceeded
}
