"""Data-free fusion with generator assistants (paper 003): generators, generator assistants,
the teacher-side objective a party evaluates, and the training schedules of DFMF and its
baselines."""
