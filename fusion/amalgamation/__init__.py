"""Knowledge amalgamation (paper 004): one compact student for the union of the teachers'
class sets, learned from their features (feature amalgamation, Eq. 1 and 4), layer by layer
through feature adaptation modules (Eq. 3 and 5), then jointly on their score vectors."""
